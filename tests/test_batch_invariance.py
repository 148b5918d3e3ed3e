"""Batch invariance: a seeded request gives the same tokens and bitwise the same logprobs alone
and inside any batch, because every CPU kernel computes a row in an order that does not depend
on what else shares the step (rows, chunks, requests).

Real vocabulary size (201,088 logits a row), temperature 1 so that a last-bit difference in any
logit would move the inverse-CDF draw sooner or later, chunked prefill (64-token budget) so the
request's prompt is split differently depending on its neighbours.
"""

import pytest
import torch

from moerun import LLM, SamplingParams
from moerun.ops import cpu

from conftest import SMALL

pytestmark = pytest.mark.skipif(not cpu.available(), reason="CPU kernels could not be built")

# hidden 128 and head dim 32: the kernels' SIMD paths and tails, at the real vocabulary size
CFG = SMALL.replace(vocab_size=201088, hidden_size=128, intermediate_size=128, head_dim=32)
GEN_TOKENS = 32


def _others(n: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 301, (n,), generator=g).tolist()
    return [torch.randint(0, CFG.vocab_size, (k,), generator=g).tolist() for k in lengths]


@pytest.fixture(scope="module")
def folder(make_checkpoint):
    return make_checkpoint(CFG, "hf", seed=5)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_seeded_sampling_is_the_same_alone_and_in_batches(folder, dtype):
    llm = LLM(str(folder), dtype=dtype, max_model_len=512, kv_cache_memory="64MiB",
              max_num_batched_tokens=64)  # fmt: skip
    target = torch.randint(0, CFG.vocab_size, (45,), generator=torch.Generator().manual_seed(1))
    target = target.tolist()
    for top_p in (1.0, 0.9):
        params = SamplingParams(temperature=1.0, top_p=top_p, seed=7, max_tokens=GEN_TOKENS,
                                logprobs=0, ignore_eos=True)  # fmt: skip
        alone = llm.generate([target], params)[0]
        assert len(alone.token_ids) == GEN_TOKENS
        for size in (2, 5, 8):
            others = _others(size - 1, seed=size)
            at = size // 2  # the request sits among the others, not first
            prompts = others[:at] + [target] + others[at:]
            plist = [SamplingParams(temperature=1.0, seed=100 + i, max_tokens=GEN_TOKENS,
                                    ignore_eos=True) for i in range(size)]  # fmt: skip
            plist[at] = params
            got = llm.generate(prompts, plist)[at]
            assert got.token_ids == alone.token_ids, (dtype, top_p, size)
            assert [lp.logprob for lp in got.logprobs] == [lp.logprob for lp in alone.logprobs]
