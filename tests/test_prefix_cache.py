"""Prefix caching: a request that starts with an earlier request's prompt (a chat turn) or its
whole output (a tool-call loop) resumes from cached K/V, sliding-window layers included, and
computes exactly what a cold engine computes."""

import torch

from moerun import LLM, SamplingParams
from moerun.engine.block_manager import BlockManager
from moerun.engine.sequence import Sequence

from conftest import SMALL

BS = 4  # SMALL's window is 8: a checkpoint holds the blocks of the 7 positions before a boundary


def _llm(folder, caching: bool = True, **kw) -> LLM:
    opts = dict(dtype="float32", max_model_len=256, kv_cache_memory="4MiB", block_size=BS,
                max_num_batched_tokens=32, enable_prefix_caching=caching)  # fmt: skip
    return LLM(str(folder), **{**opts, **kw})


def _tokens(n: int, seed: int) -> list[int]:
    return torch.randint(0, SMALL.vocab_size, (n,), generator=torch.Generator().manual_seed(seed))


GREEDY = SamplingParams(temperature=0, max_tokens=6, logprobs=0, ignore_eos=True)


def _same(got, want) -> None:
    assert got.token_ids == want.token_ids
    for g, w in zip(got.logprobs, want.logprobs, strict=True):
        assert abs(g.logprob - w.logprob) <= 1e-5


def test_chat_turns_and_tool_loops_resume_from_the_cache(make_checkpoint):
    folder = make_checkpoint(SMALL, "hf", seed=6)
    warm, cold = _llm(folder), _llm(folder, caching=False)
    for length in (5, 9, 30):  # the turn-1 boundary before, around and beyond the window
        turn1 = _tokens(length, length).tolist()
        first = warm.generate([turn1], GREEDY)[0]
        assert first.num_cached_tokens == 0
        # a chat turn: turn 1's prompt, then something new
        chat = turn1 + _tokens(7, 100 + length).tolist()
        got, want = warm.generate([chat], GREEDY)[0], cold.generate([chat], GREEDY)[0]
        # exactly turn 1's prompt: the partial last block is copied, not recomputed
        assert got.num_cached_tokens == length and want.num_cached_tokens == 0
        _same(got, want)
        # diverging inside turn 1's prompt: back to the last block boundary before it
        early = turn1[: length - 1] + _tokens(3, 300 + length).tolist()
        got, want = warm.generate([early], GREEDY)[0], cold.generate([early], GREEDY)[0]
        assert got.num_cached_tokens == (length - 1) // BS * BS
        _same(got, want)
        # a tool loop: everything turn 1 generated is resent, then the tool's answer
        loop = turn1 + first.token_ids + _tokens(5, 200 + length).tolist()
        got, want = warm.generate([loop], GREEDY)[0], cold.generate([loop], GREEDY)[0]
        computed = length + len(first.token_ids) - 1  # the last output token was never computed
        assert got.num_cached_tokens == computed
        _same(got, want)
        warm.engine.blocks.check()


def test_eviction_preemption_and_concurrency_never_corrupt(make_checkpoint):
    """A KV budget too small for the traffic: cached blocks and window checkpoints are evicted
    and requests preempted while others share cached blocks; every result equals a cold run and
    the block pools stay consistent after every step."""
    folder = make_checkpoint(SMALL, "hf", seed=6)
    warm = _llm(folder, kv_cache_memory="90KiB", max_num_seqs=6, max_model_len=128)
    cold = _llm(folder, caching=False)
    base = _tokens(40, 1).tolist()
    prompts = [base + _tokens(k, 50 + k).tolist() for k in (3, 11, 20, 29, 36)]
    prompts += [_tokens(60, 7).tolist(), base[:21], base[:21] + _tokens(6, 9).tolist()]
    want = cold.generate(prompts, GREEDY)
    engine, cached = warm.engine, []
    for _ in range(2):  # the second round finds what the first left (or what survived)
        ids = [engine.add_request(p, GREEDY) for p in prompts]
        outs = {i: [] for i in ids}
        while engine.has_unfinished():
            for delta in engine.step():
                outs[delta.request_id].append(delta)
            engine.blocks.check()
        for i, w in zip(ids, want, strict=True):
            assert [t for d in outs[i] for t in d.token_ids] == w.token_ids
            cached += [d.num_cached_tokens for d in outs[i][:1]]
    assert engine.scheduler.num_preemptions > 0
    assert any(n % BS for n in cached)  # some resumed inside a block, from a copy
    assert engine.stats().prefix_hit_tokens > 0


def test_salts_and_prompt_logprobs_never_share():
    blocks = BlockManager(64, 64, BS, 8, prefix_caching=True)
    params = SamplingParams(temperature=0)
    tokens = list(range(1, 30))

    def run(salt: str | None, p: SamplingParams = params) -> Sequence:
        seq = Sequence("r", tokens, p, 0, cache_salt=salt)
        cached = blocks.adopt_prefix(seq)
        blocks.allocate(seq, seq.num_uncomputed)
        seq.num_computed_tokens = seq.num_tokens
        blocks.checkpoint(seq)
        blocks.free(seq)
        return cached

    assert run("alice") == 0
    assert run("alice") == 28  # the last token is always computed: 28 = 7 blocks of 4
    assert run("bob") == 0 and run(None) == 0
    assert run("alice", SamplingParams(temperature=0, prompt_logprobs=1)) == 0
    blocks.check()
