"""Chunked online-softmax attention (long contexts) against the one-shot reference."""

import pytest
import torch

import moerun.ops.attention as attention
from moerun import LLM, SamplingParams
from moerun.ops.attention import online_attention, sink_attention

from conftest import SMALL


@pytest.mark.parametrize("window", [0, 5])
@pytest.mark.parametrize("T", [1, 7])
def test_online_attention_equals_reference(window, T):
    g = torch.Generator().manual_seed(T + window)
    K, G, d, S = 2, 3, 16, 40
    q = torch.randn(T, K, G, d, generator=g)
    k, v = torch.randn(S, K, d, generator=g), torch.randn(S, K, d, generator=g)
    sinks = torch.randn(K * G, generator=g) * 2
    k_pos = torch.arange(S)
    q_pos = torch.arange(S - T, S)  # the last T positions, as in decode / a prefill chunk
    ref = sink_attention(q, k, v, sinks, 0.25, window, q_pos, k_pos)
    chunks = [lambda a=a: (k[a : a + 6], v[a : a + 6], k_pos[a : a + 6]) for a in range(0, S, 6)]
    ours = online_attention(q, chunks, sinks, 0.25, window, q_pos).reshape(T, -1)
    assert torch.allclose(ours, ref, atol=1e-5, rtol=1e-5)


def test_engine_with_chunked_long_context_attention(make_checkpoint, monkeypatch):
    """Force the chunked path (KEY_CHUNK = 8 keys): generation is unchanged."""
    folder = make_checkpoint(SMALL, "hf", seed=4)
    prompt = torch.randint(0, SMALL.vocab_size, (60,), generator=torch.Generator().manual_seed(3))
    params = SamplingParams(temperature=0, max_tokens=12)
    opts = dict(dtype="float32", max_model_len=256, kv_cache_memory="8MiB", block_size=4,
                max_num_batched_tokens=16)  # fmt: skip
    expected = LLM(str(folder), **opts).generate([prompt.tolist()], params)[0].token_ids
    monkeypatch.setattr(attention, "KEY_CHUNK", 8)
    assert LLM(str(folder), **opts).generate([prompt.tolist()], params)[0].token_ids == expected
