"""Decode steps over static, padded input buffers, replayed from CUDA graphs (one per batch size).

A decode step launches a few hundred small kernels; replaying them as one captured graph removes
the CPU launch gaps that otherwise dominate batch-1 decode. The graph reads its inputs from
buffers that live as long as it does, so a step copies its tokens, positions, block tables and
lengths into them and pads the batch up to the next captured size. Padded rows hold no blocks
(table -1): their K/V are never stored, their keys never read, their logits dropped.

On a CPU (the Triton interpreter, in tests) the same padded buffers run eagerly: exactly what a
graph would replay, minus the capture.
"""

import numpy as np
import torch

from moerun.model.gpt_oss import Transformer
from moerun.ops.paged import LayerKV, Paging, StepCache, StepRows, table_slots


def batch_sizes(max_batch: int) -> list[int]:
    """1, 2, 4, 8, then steps of 16: padding wastes at most 15 rows past batch 16."""
    sizes = [b for b in (1, 2, 4, 8) if b < max_batch] + list(range(16, max_batch, 16))
    return sizes + [max_batch]


class DecodeGraphs:
    def __init__(
        self, model: Transformer, kv, max_batch: int, max_blocks: int, kinds: list[str]
    ) -> None:
        self.model, self.kv, self.kinds = model, kv, kinds
        self.sizes = batch_sizes(max_batch)
        self.block_size, self.max_blocks = kv.block_size, max_blocks
        dev = model.device
        n = max_batch
        # All inputs in one int32 buffer, a row per sequence: [token, position, table per kind],
        # so that a step's rows [0, b) are one contiguous host-to-device copy
        width = 2 + len(kinds) * max_blocks
        self.inputs = torch.zeros(n, width, dtype=torch.int32, device=dev)
        self.staging = torch.zeros(n, width, dtype=torch.int32, pin_memory=dev.type == "cuda")
        self._pad(self.staging.numpy(), 0, n)
        self.inputs.copy_(self.staging)
        self.cu = torch.arange(n + 1, dtype=torch.int32, device=dev)  # one row per sequence
        self.rows = torch.arange(n, dtype=torch.int32, device=dev)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        if dev.type == "cuda":
            self._capture_all()

    def fits(self, batch_size: int) -> bool:
        return batch_size <= self.sizes[-1]

    def _table(self, k: int) -> slice:
        return slice(2 + k * self.max_blocks, 2 + (k + 1) * self.max_blocks)

    def _forward(self, b: int) -> torch.Tensor:
        """The step a graph records: [b] tokens -> [b, V] logits, all from the static buffer."""
        rows, bs = self.inputs[:b], self.block_size
        tokens, positions = rows[:, 0], rows[:, 1]  # [b] each (strided views)
        seq_lens = positions + 1  # contiguous: the decode kernel reads it with unit stride
        # one row per sequence; cu_seqlens and q_start serve the prefill kernel, unused here;
        # no host layout (seqs=[]): only a backend that reads the device tensors replays graphs
        step = StepRows(positions, self.rows[:b], self.cu[: b + 1], seq_lens, seq_lens,
                        max_seqlen_q=1, seqs=[])  # fmt: skip
        paging = {}
        for k, kind in enumerate(self.kinds):
            table = rows[:, self._table(k)]  # [b, max_blocks], row stride = the buffer's width
            paging[kind] = Paging(table_slots(table, self.rows[:b], positions, bs), table)
        layers = [LayerKV(kc, vc, paging[kind]) for kc, vc, kind in
                  zip(self.kv.k, self.kv.v, self.model.cfg.layer_types, strict=True)]  # fmt: skip
        hidden = self.model.forward_batch(tokens, StepCache(layers, step))
        return self.model.logits(hidden)

    @torch.inference_mode()
    def _capture_all(self) -> None:
        """Largest first, so smaller graphs reuse its memory pool. The buffer holds padding
        only: every slot is negative, nothing is written to the cache while capturing."""
        pool = None
        for b in reversed(self.sizes):
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # warm up off the capture: Triton compiles, cuBLAS plans
                for _ in range(2):
                    self._forward(b)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                logits = self._forward(b)
            pool = graph.pool()
            self.graphs[b] = (graph, logits)
        torch.cuda.synchronize()

    def _pad(self, host: np.ndarray, start: int, end: int) -> None:
        """Rows [start, end) as padding: token 0 at position 0, no blocks (table -1)."""
        host[start:end, :2] = 0
        host[start:end, 2:] = -1

    def run(self, tokens: list[int], positions: list[int], tables: dict[str, np.ndarray]):
        """One decode step of len(tokens) sequences. tables[kind] [B, width <= max_blocks]
        int32. Returns logits [B, V] on the device."""
        B = len(tokens)
        b = next(s for s in self.sizes if s >= B)
        # the previous step's copy is done: its sampled ids were read back before this step
        host = self.staging.numpy()
        host[:B, 0], host[:B, 1] = tokens, positions
        for k, kind in enumerate(self.kinds):
            cols, w = self._table(k), tables[kind].shape[1]
            host[:B, cols.start : cols.start + w] = tables[kind]
            host[:B, cols.start + w : cols.stop] = -1
        self._pad(host, B, b)  # rows that held sequences last step must not write K/V now
        self.inputs[:b].copy_(self.staging[:b], non_blocking=True)
        if b in self.graphs:
            graph, logits = self.graphs[b]
            graph.replay()
            return logits[:B]
        with torch.inference_mode():
            return self._forward(b)[:B]
