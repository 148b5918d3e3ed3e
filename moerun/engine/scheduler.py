"""Continuous batching over `num_computed_tokens` (vLLM v1's idea: no prefill/decode phases).

Every step each running request catches up on its uncomputed tokens within a shared token
budget: decodes (1 token) first, then chunks of unfinished prompts, then new requests in arrival
order. When KV blocks run out the newest running request is preempted: its blocks are freed and
it is recomputed later from its tokens. Plain Python, no tensors: testable without a model.
"""

from collections import deque
from typing import NamedTuple

from moerun.config import EngineConfig
from moerun.engine.block_manager import BlockManager
from moerun.engine.sequence import BlockCopy, Sequence, Status


class ScheduledSeq(NamedTuple):
    seq: Sequence
    num_new_tokens: int  # computes positions [num_computed_tokens, + num_new_tokens)


class SchedulerOutput(NamedTuple):
    scheduled: list[ScheduledSeq]
    preempted: list[Sequence]
    copies: list[BlockCopy]  # cached partial blocks into the blocks of requests resuming there


class Scheduler:
    def __init__(self, cfg: EngineConfig, blocks: BlockManager, max_model_len: int) -> None:
        self.cfg, self.blocks, self.max_model_len = cfg, blocks, max_model_len
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        # prefix cache: tokens of admitted requests, and how many of them came from the cache
        self.prefix_queried_tokens = self.prefix_hit_tokens = 0

    def add(self, seq: Sequence) -> None:
        assert seq.status == Status.WAITING and seq.num_computed_tokens == 0
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        budget = self.cfg.max_num_batched_tokens
        scheduled: list[ScheduledSeq] = []
        preempted: list[Sequence] = []
        # decodes before prompt chunks, each group oldest first
        for seq in sorted(self.running, key=lambda s: (s.num_uncomputed > 1, s.arrival)):
            if budget == 0 or seq.status != Status.RUNNING:
                continue
            n = min(seq.num_uncomputed, budget)
            while not self.blocks.can_allocate(seq, n):
                victim = max(self.running, key=lambda s: s.arrival)
                for i, done in enumerate(scheduled):  # already planned this step: undo it
                    if done.seq is victim:
                        budget += scheduled.pop(i).num_new_tokens
                        break
                self._preempt(victim)
                preempted.append(victim)
                if victim is seq:
                    break
            else:
                self.blocks.allocate(seq, n)
                scheduled.append(ScheduledSeq(seq, n))
                budget -= n
        # admit waiting requests only when nothing had to give way this step
        while not preempted and self.waiting and budget > 0:
            if len(self.running) >= self.cfg.max_num_seqs:
                break
            seq = self.waiting[0]
            cached = self.blocks.adopt_prefix(seq)
            n = min(seq.num_uncomputed, budget)
            if not self.blocks.can_allocate(seq, n):
                self.blocks.free(seq)  # give the cached blocks back; try again next step
                seq.num_computed_tokens = seq.num_cached_tokens = 0
                break
            self.prefix_queried_tokens += seq.num_tokens
            self.prefix_hit_tokens += cached
            self.waiting.popleft()
            seq.status = Status.RUNNING
            self.running.append(seq)
            self.blocks.allocate(seq, n)
            scheduled.append(ScheduledSeq(seq, n))
            budget -= n
        copies = [c for s, _ in scheduled for c in s.pending_copies]
        return SchedulerOutput(scheduled, preempted, copies)

    def _preempt(self, seq: Sequence) -> None:
        """Free everything; the request recomputes prompt + generated tokens when readmitted."""
        self.running.remove(seq)
        self.blocks.checkpoint(seq)  # readmitted, it resumes near where it stopped
        self.blocks.free(seq)
        self.num_preemptions += 1
        seq.num_computed_tokens = 0
        seq.status = Status.WAITING
        self.waiting.appendleft(seq)  # first in line: it arrived before anything waiting

    def postprocess(self, scheduled: list[ScheduledSeq], sampled: list[int | None]) -> None:
        """End of a step, all bookkeeping in one place: advance each sequence over the tokens
        it computed, append its sampled token (None: a prompt chunk that samples nothing yet),
        stop it (a stop id, max_tokens, max_model_len) and free its blocks, or else release
        the window blocks no query sees any more and hash its completed blocks."""
        for (seq, n), token in zip(scheduled, sampled, strict=True):
            self.blocks.copies_done(seq)
            seq.num_computed_tokens += n
            if seq.num_computed_tokens - n < seq.num_prompt_tokens <= seq.num_computed_tokens:
                self.blocks.checkpoint(seq)  # the next chat turn resumes from its prompt
            if token is not None:
                seq.output_token_ids.append(token)
                if seq.constraint is not None:
                    seq.constraint.accept(token)
                if token in seq.stop_token_ids:
                    self.finish(seq, "stop")
                elif (len(seq.output_token_ids) >= seq.params.max_tokens
                      or seq.num_tokens >= self.max_model_len):  # fmt: skip
                    self.finish(seq, "length")
            if not seq.is_finished:
                self.blocks.release_stale(seq)

    def finish(self, seq: Sequence, reason: str) -> None:
        """End a request (stop, length, abort) wherever it is and free its blocks."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        if reason != "abort":
            self.blocks.checkpoint(seq)  # a tool-call loop resends everything generated
        self.blocks.free(seq)
        seq.status, seq.finish_reason = Status.FINISHED, reason
