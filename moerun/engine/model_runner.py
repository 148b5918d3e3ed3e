"""Scheduled batch -> tensors -> model -> the logits that are needed. The engine's tensors are
built here (and, for captured decode steps, in cuda_graph.py from the same block tables).

The batch is ragged: each sequence contributes the rows of its new tokens (a decode token or a
prompt chunk). Every layer stores the step's K/V in the paged cache first and reads keys back
from it (moerun.ops.paged). Only rows that need logits are unembedded: the last row of a
sequence that has caught up with its tokens (it samples), and prompt rows when prompt_logprobs
asks for them.
"""

from typing import NamedTuple

import numpy as np
import torch

from moerun.engine.cuda_graph import DecodeGraphs
from moerun.engine.kv_cache import KVCache
from moerun.engine.scheduler import ScheduledSeq
from moerun.engine.sequence import BlockCopy, Sequence
from moerun.model.config import FULL, SLIDING
from moerun.model.gpt_oss import Transformer
from moerun.ops.paged import LayerKV, Paging, SeqRows, StepCache, step_rows, table_slots


class SeqLogits(NamedTuple):
    seq: Sequence
    sample_row: int | None  # row of `logits` to sample the next token from
    prompt_rows: range  # rows of `logits` predicting prompt tokens prompt_targets
    prompt_targets: list[int]


class ModelOutput(NamedTuple):
    logits: torch.Tensor  # [R, V] float32
    per_seq: list[SeqLogits]


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


def logit_rows(batch: list[ScheduledSeq]) -> tuple[list[int], list[SeqLogits]]:
    """Which batch rows are unembedded, and what each sequence does with them."""
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


class ModelRunner:
    def __init__(self, model: Transformer, kv: KVCache, max_batch: int = 0,
                 max_model_len: int = 0) -> None:  # fmt: skip
        """max_batch > 0: decode steps of up to max_batch sequences replay CUDA graphs (on a
        CPU: the same padded buffers, run eagerly)."""
        self.model, self.kv = model, kv
        self.block_size = kv.block_size
        self.device = model.device
        self.kinds = [k for k in (FULL, SLIDING) if k in model.cfg.layer_types]
        self.graphs = None
        if max_batch > 0:
            max_blocks = -(-max_model_len // self.block_size)
            self.graphs = DecodeGraphs(model, kv, max_batch, max_blocks, self.kinds)

    def _inputs(self, batch: list[ScheduledSeq]) -> tuple[torch.Tensor, StepCache]:
        tokens: list[int] = []
        positions: list[int] = []
        seqs: list[SeqRows] = []
        for seq, n in batch:
            start = seq.num_computed_tokens
            seqs.append(SeqRows(len(tokens), len(tokens) + n, start))
            tokens += seq.token_ids(start, start + n)
            positions += range(start, start + n)
        long = lambda xs: torch.tensor(xs, dtype=torch.long).to(self.device)  # noqa: E731
        # int32 like the other row tensors: the kernels take them as they are, no per-layer cast
        positions_t = torch.tensor(positions, dtype=torch.int32).to(self.device)
        rows = step_rows(seqs, positions_t, self.device)
        paging = {}
        for kind in self.kinds:  # the table on the device; each new token's slot gathered there
            table = torch.from_numpy(block_table(batch, kind == FULL, self.block_size))
            table = table.to(self.device)
            slots = table_slots(table, rows.seq_of_row, rows.positions, self.block_size)
            paging[kind] = Paging(slots, table)
        layers = [LayerKV(k, v, paging[kind]) for k, v, kind in
                  zip(self.kv.k, self.kv.v, self.model.cfg.layer_types, strict=True)]  # fmt: skip
        return long(tokens), StepCache(layers, rows)

    def _replay(self, batch: list[ScheduledSeq]) -> torch.Tensor:
        """A decode step (one token per sequence) from the captured graphs: [B, V] logits."""
        starts = [seq.num_computed_tokens for seq, _ in batch]
        tokens = [seq.token_ids(p, p + 1)[0] for (seq, _), p in zip(batch, starts, strict=True)]
        tables = {kind: block_table(batch, kind == FULL, self.block_size) for kind in self.kinds}
        return self.graphs.run(tokens, starts, tables)

    def _copy_blocks(self, copies: list[BlockCopy]) -> None:
        """Cached partial blocks into the blocks of the requests resuming inside them."""
        for full in (True, False):
            pairs = [(c.src, c.dst) for c in copies if c.full == full]
            if not pairs:
                continue
            src, dst = (torch.tensor(x, device=self.device) for x in zip(*pairs, strict=True))
            kinds = self.model.cfg.layer_types
            for k, v, kind in zip(self.kv.k, self.kv.v, kinds, strict=True):
                if (kind == FULL) == full:
                    k[dst], v[dst] = k[src], v[src]

    @torch.inference_mode()
    def run(self, batch: list[ScheduledSeq], copies: list[BlockCopy] = ()) -> ModelOutput:
        if copies:
            self._copy_blocks(copies)
        rows, per_seq = logit_rows(batch)
        index = torch.tensor(rows, dtype=torch.long).to(self.device)
        graphs = self.graphs
        if graphs and graphs.fits(len(batch)) and all(n == 1 for _, n in batch):
            logits = self._replay(batch)[index]  # batch row i = sequence i
        else:
            tokens, cache = self._inputs(batch)
            hidden = self.model.forward_batch(tokens, cache)
            logits = self.model.logits(hidden[index])
        return ModelOutput(logits.float(), per_seq)  # [R, V], on the model's device
