"""Scheduler and block manager with no model: the plan is plain Python over integer counters."""

import dataclasses
import math

import pytest
import torch

from moerun.config import EngineConfig
from moerun.engine.block_manager import BlockManager
from moerun.engine.kv_cache import plan_blocks
from moerun.engine.scheduler import Scheduler
from moerun.engine.sequence import Sequence, Status
from moerun.sampling import SamplingParams

from conftest import SMALL


def _setup(budget=16, full_blocks=64, window_blocks=64, bs=4, window=8, max_seqs=8, max_len=1000,
           caching=False):  # fmt: skip
    cfg = EngineConfig("unused", max_num_batched_tokens=budget, block_size=bs,
                       max_num_seqs=max_seqs, max_model_len=max_len)  # fmt: skip
    blocks = BlockManager(full_blocks, window_blocks, bs, window, prefix_caching=caching)
    return Scheduler(cfg, blocks, max_len), blocks


_arrivals = iter(range(10**6))


def _seq(prompt_len: int, **params) -> Sequence:
    p = SamplingParams(temperature=0, **{"max_tokens": 100, **params})
    return Sequence(f"r{prompt_len}", list(range(1, prompt_len + 1)), p, next(_arrivals),
                    stop_token_ids=frozenset(p.stop_token_ids))  # fmt: skip


def _run_step(sched: Scheduler, token: int = 7) -> dict[Sequence, int]:
    """What the engine does around the model: sample for sequences that caught up, then the
    scheduler's end-of-step bookkeeping."""
    plan = sched.schedule()
    sampled = [token if seq.num_computed_tokens + n == seq.num_tokens else None
               for seq, n in plan.scheduled]  # fmt: skip
    sched.postprocess(plan.scheduled, sampled)
    return {seq: n for seq, n in plan.scheduled}


def test_chunked_prefill_respects_the_token_budget():
    sched, _ = _setup(budget=16)
    seq = _seq(50)
    sched.add(seq)
    chunks = [_run_step(sched)[seq] for _ in range(5)]
    assert chunks == [16, 16, 16, 2, 1]  # prompt in chunks, then one decode token
    assert seq.output_token_ids == [7, 7]


def test_budget_is_shared_and_never_exceeded():
    sched, _ = _setup(budget=10)
    seqs = [_seq(n) for n in (3, 25, 7, 12)]
    for s in seqs:
        sched.add(s)
    for _ in range(30):
        assert sum(_run_step(sched).values()) <= 10


def test_decodes_go_before_prompt_chunks():
    sched, _ = _setup(budget=4)
    a, b = _seq(2), _seq(3)
    for s in (a, b):
        sched.add(s)
    _run_step(sched)  # both prompts fit (2 + 2 of 3), a samples
    late = _seq(40)
    sched.add(late)
    plan = sched.schedule()
    # a decodes (1), b finishes its prompt (1), the new prompt only gets what is left (2)
    assert [(s.seq, s.num_new_tokens) for s in plan.scheduled] == [(a, 1), (b, 1), (late, 2)]


def test_preempts_the_newest_and_recomputes_it():
    # 6 blocks of 4 tokens for full layers: two 10-token prompts fit, growing past 12 does not
    sched, blocks = _setup(budget=64, full_blocks=6, window_blocks=64)
    old, new = _seq(10), _seq(10)
    sched.add(old)
    sched.add(new)
    _run_step(sched)  # both prefilled (3 blocks each), both sample -> 11 tokens
    _run_step(sched)  # position 10 computed -> 12 tokens
    _run_step(sched)  # position 11 computed: 12 positions fill 3 blocks exactly -> 13 tokens
    plan = sched.schedule()  # position 12 needs a 4th block for each: none free
    assert plan.preempted == [new] and sched.num_preemptions == 1
    assert new.status == Status.WAITING and new.num_computed_tokens == 0 and not new.full_blocks
    assert sched.waiting[0] is new and [s.seq for s in plan.scheduled] == [old]
    assert len(new.output_token_ids) == 3  # kept: recomputed from prompt + outputs later
    blocks.check()


def test_finish_on_stop_token_max_tokens_and_max_model_len():
    sched, blocks = _setup(max_len=20)
    stop, capped, long = _seq(3, stop_token_ids=[7]), _seq(3, max_tokens=2), _seq(17)
    for s in (stop, capped, long):
        sched.add(s)
    for _ in range(5):
        _run_step(sched)
    assert (stop.finish_reason, stop.output_token_ids) == ("stop", [7])
    assert (capped.finish_reason, len(capped.output_token_ids)) == ("length", 2)
    assert (long.finish_reason, long.num_tokens) == ("length", 20)
    assert not sched.has_unfinished()
    assert blocks.full.num_free == blocks.full.num_blocks
    blocks.check()


@pytest.mark.parametrize("budget", [1, 3, 16])
def test_sliding_layers_hold_at_most_ceil_window_over_block_plus_one(budget):
    bs, window = 4, 10
    sched, blocks = _setup(budget=budget, bs=bs, window=window)
    seqs = [_seq(37), _seq(5)]
    for s in seqs:
        sched.add(s)
    bound = math.ceil(window / bs) + 1  # between steps; a step holds its chunk's blocks too
    for _ in range(80):
        _run_step(sched)
        for s in sched.running:
            assert len(s.window_blocks) <= bound, (s.num_computed_tokens, s.window_blocks)
            # the cached window the next token reads is all there
            first = max(0, s.num_computed_tokens - window + 1)
            assert all(p // bs in s.window_blocks for p in range(first, s.num_computed_tokens))
            assert len(s.full_blocks) == math.ceil(s.num_computed_tokens / bs)
    blocks.check()


def test_abort_frees_every_block_and_full_blocks_get_hashes():
    sched, blocks = _setup(budget=32, caching=True)
    a, b = _seq(9), _seq(9)
    for s in (a, b):
        sched.add(s)
    _run_step(sched)
    assert a.num_hashed_blocks == 2  # 9 computed tokens: two full blocks of 4
    assert blocks.full.lookup(a.last_block_hash) == (a.full_blocks[1],)
    # same tokens, same hashes: the prefix cache finds blocks by content; b computed its own
    # (both were admitted in one step, before a's blocks were complete), which stay unindexed
    assert a.last_block_hash == b.last_block_hash and b.full_blocks[1] != a.full_blocks[1]
    sched.finish(a, "abort")
    sched.finish(b, "abort")
    assert blocks.full.num_free == blocks.full.num_blocks  # cached blocks count as free
    assert blocks.windowed.num_free == blocks.windowed.num_blocks
    # a's two full blocks and its partial third (the exact end of its prompt): findable
    # until reallocated
    assert blocks.full.num_cached == 3
    blocks.check()


def test_window_blocks_are_reserved_for_a_whole_chunk():
    """A step writes all its new positions before attention reads them back, so sliding
    layers need, besides the blocks each sequence keeps, the blocks of a whole chunk."""
    cfg = EngineConfig(
        "unused",
        max_num_seqs=3,
        max_num_batched_tokens=64,
        block_size=4,
        max_model_len=64,
        kv_cache_memory="1MiB",
        enable_prefix_caching=False,
    )
    _, window_blocks = plan_blocks(SMALL, cfg, torch.float32)
    kept = -(-(SMALL.sliding_window - 1) // 4) + 1  # blocks a sequence keeps between steps
    # 3 sequences: kept + 2 partial blocks each, plus one 64-token chunk's 16 blocks
    assert window_blocks == 3 * (kept + 2) + 16
    # with prefix caching, room for as many window checkpoints as sequences
    _, cached = plan_blocks(
        SMALL, dataclasses.replace(cfg, enable_prefix_caching=True), torch.float32
    )
    assert cached == window_blocks + 3 * kept
