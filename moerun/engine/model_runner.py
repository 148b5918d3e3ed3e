"""Scheduled batch -> tensors -> model -> the logits that are needed. The only engine file that
builds tensors.

The batch is ragged: each sequence contributes the rows of its new tokens (a decode token or a
prompt chunk). Only rows that need logits are unembedded: the last row of a sequence that has
caught up with its tokens (it samples), and prompt rows when prompt_logprobs asks for them.
"""

from typing import NamedTuple

import numpy as np
import torch

from moerun.engine.cuda_graph import DecodeGraphs
from moerun.engine.kv_cache import KVCache
from moerun.engine.scheduler import ScheduledSeq
from moerun.engine.sequence import Sequence
from moerun.model.config import FULL, SLIDING
from moerun.model.gpt_oss import Transformer
from moerun.ops.attention import CacheIO, PagedIO, SeqRows, table_slots


class SeqLogits(NamedTuple):
    seq: Sequence
    sample_row: int | None  # row of `logits` to sample the next token from
    prompt_rows: range  # rows of `logits` predicting prompt tokens prompt_targets
    prompt_targets: list[int]


class ModelOutput(NamedTuple):
    logits: torch.Tensor  # [R, V] float32
    per_seq: list[SeqLogits]


def _slots(table: list[int] | dict[int, int], positions: range, block_size: int) -> list[int]:
    return [table[p // block_size] * block_size + p % block_size for p in positions]


def block_table(batch: list[ScheduledSeq], full: bool, block_size: int) -> np.ndarray:
    """[B, width] int32 on the host: logical block -> physical block, -1 where none is held
    (sliding layers hold only the window's blocks). numpy row writes: 4x faster than torch's
    per-row indexing, which at batch 64 cost ~1 ms a step."""
    width = max(-(-(seq.num_computed_tokens + n) // block_size) for seq, n in batch)
    table = np.full((len(batch), width), -1, dtype=np.int32)
    for i, (seq, _) in enumerate(batch):
        if full:
            table[i, : len(seq.full_blocks)] = seq.full_blocks[:width]
        else:
            table[i, list(seq.window_blocks)] = list(seq.window_blocks.values())
    return table


class ModelRunner:
    def __init__(self, model: Transformer, kv: KVCache, max_batch: int = 0,
                 max_model_len: int = 0) -> None:  # fmt: skip
        """max_batch > 0 on the Triton path: decode steps of up to max_batch sequences replay
        CUDA graphs (on a CPU: the same padded buffers, run eagerly)."""
        self.model, self.kv = model, kv
        self.block_size = kv.block_size
        self.window = model.cfg.sliding_window
        self.device = model.device
        self.paged = model.kernels == "triton"  # K/V written first, tables read on the device
        self.kinds = [k for k in (FULL, SLIDING) if k in model.cfg.layer_types]
        self.graphs = None
        if self.paged and max_batch > 0:
            max_blocks = -(-max_model_len // self.block_size)
            self.graphs = DecodeGraphs(model, kv, max_batch, max_blocks, self.kinds)

    def _long(self, xs: list[int]) -> torch.Tensor:
        return torch.tensor(xs, dtype=torch.long).to(self.device)

    def _cache_io(self, batch: list[ScheduledSeq], full: bool) -> CacheIO:
        """Reads: the cached positions each sequence's new tokens can see. Writes: new positions
        later steps will read (sliding layers skip those already out of the window)."""
        bs, w = self.block_size, self.window
        reads, firsts, rows, slots = [], [], [], []
        row = 0
        for seq, n in batch:
            start, end = seq.num_computed_tokens, seq.num_computed_tokens + n
            table = seq.full_blocks if full else seq.window_blocks
            first = 0 if full else max(0, start - w + 1)
            reads.append(self._long(_slots(table, range(first, start), bs)))
            firsts.append(first)
            write_from = start if full else max(start, end - w + 1)
            rows += range(row + write_from - start, row + n)
            slots += _slots(table, range(write_from, end), bs)
            row += n
        return CacheIO(reads, firsts, self._long(rows), self._long(slots))

    def _logit_rows(self, batch: list[ScheduledSeq]) -> tuple[list[int], list[SeqLogits]]:
        rows: list[int] = []
        per_seq: list[SeqLogits] = []
        row = 0
        for seq, n in batch:
            start, end = seq.num_computed_tokens, seq.num_computed_tokens + n
            prompt_rows, targets = range(0), []
            if seq.params.prompt_logprobs is not None:
                # row of position p predicts prompt token p + 1; skip positions already done
                first = max(start, len(seq.prompt_logprobs) - 1 if seq.prompt_logprobs else 0)
                last = min(end, seq.num_prompt_tokens - 1)
                if first < last:
                    prompt_rows = range(len(rows), len(rows) + last - first)
                    rows += range(row + first - start, row + last - start)
                    targets = seq.prompt_token_ids[first + 1 : last + 1]
            sample_row = None
            if end == seq.num_tokens:
                sample_row = len(rows)
                rows.append(row + n - 1)
            per_seq.append(SeqLogits(seq, sample_row, prompt_rows, targets))
            row += n
        return rows, per_seq

    def _paged_io(self, batch: list[ScheduledSeq], full: bool, seq_of_row: torch.Tensor,
                  positions: torch.Tensor, shared: tuple) -> PagedIO:  # fmt: skip
        """The block table on the device, and each new token's slot gathered from it there."""
        bs = self.block_size
        table = torch.from_numpy(block_table(batch, full, bs)).to(self.device)
        slots = table_slots(table, seq_of_row, positions, bs)  # [N]
        return PagedIO(slots, table, *shared)

    def _inputs(self, batch: list[ScheduledSeq]):
        tokens: list[int] = []
        positions: list[int] = []
        seqs: list[SeqRows] = []
        for seq, n in batch:
            start = seq.num_computed_tokens
            seqs.append(SeqRows(len(tokens), len(tokens) + n, start))
            tokens += seq.token_ids(start, start + n)
            positions += range(start, start + n)
        return self._long(tokens), self._long(positions), seqs

    def _io(self, batch: list[ScheduledSeq], positions: torch.Tensor, seqs: list[SeqRows]):
        if not self.paged:
            return {kind: self._cache_io(batch, kind == FULL) for kind in self.kinds}
        i32 = lambda xs: torch.tensor(xs, dtype=torch.int32).to(self.device)  # noqa: E731
        counts = [r1 - r0 for r0, r1, _ in seqs]
        seq_of_row = torch.repeat_interleave(torch.arange(len(seqs)), torch.tensor(counts))
        shared = (
            i32([0] + [r1 for _, r1, _ in seqs]),  # cu_seqlens_q
            i32([start for _, _, start in seqs]),
            i32([start + n for (_, _, start), n in zip(seqs, counts, strict=True)]),
            max(counts),
        )
        seq_of_row = seq_of_row.to(self.device)
        return {kind: self._paged_io(batch, kind == FULL, seq_of_row, positions, shared)
                for kind in self.kinds}  # fmt: skip

    def _replay(self, batch: list[ScheduledSeq]) -> torch.Tensor:
        """A decode step (one token per sequence) from the captured graphs: [B, V] logits."""
        starts = [seq.num_computed_tokens for seq, _ in batch]
        tokens = [seq.token_ids(p, p + 1)[0] for (seq, _), p in zip(batch, starts, strict=True)]
        tables = {kind: block_table(batch, kind == FULL, self.block_size) for kind in self.kinds}
        return self.graphs.run(tokens, starts, tables)

    @torch.inference_mode()
    def run(self, batch: list[ScheduledSeq]) -> ModelOutput:
        rows, per_seq = self._logit_rows(batch)
        index = torch.tensor(rows, dtype=torch.long).to(self.device)
        graphs = self.graphs
        if graphs and graphs.fits(len(batch)) and all(n == 1 for _, n in batch):
            logits = self._replay(batch)[index]  # batch row i = sequence i
        else:
            tokens, positions, seqs = self._inputs(batch)
            io = self._io(batch, positions, seqs)
            hidden = self.model.forward_batch(tokens, positions, seqs, self.kv, io)
            logits = self.model.logits(hidden[index])
        return ModelOutput(logits.float(), per_seq)  # [R, V], on the model's device
