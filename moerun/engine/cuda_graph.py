"""Decode steps over static, padded input buffers, replayed from CUDA graphs (one per batch size).

A decode step launches a few hundred small kernels; replaying them as one captured graph removes
the CPU launch gaps that otherwise dominate batch-1 decode. The graph reads its inputs from
buffers that live as long as it does, so a step copies its tokens, positions, block tables and
lengths into them and pads the batch up to the next captured size. Padded rows hold no blocks
(table -1): their K/V are never stored, their keys never read, their logits dropped.

On a CPU (the Triton interpreter, in tests) the same padded buffers run eagerly: exactly what a
graph would replay, minus the capture.
"""

import torch

from moerun.model.gpt_oss import Transformer
from moerun.ops.attention import PagedIO


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
        self.block_size = kv.block_size
        dev = model.embedding.weight.device
        n = max_batch
        self.tokens = torch.zeros(n, dtype=torch.long, device=dev)
        self.positions = torch.zeros(n, dtype=torch.long, device=dev)
        self.seq_lens = torch.ones(n, dtype=torch.int32, device=dev)
        self.tables = {k: torch.full((n, max_blocks), -1, dtype=torch.int32, device=dev)
                       for k in kinds}  # fmt: skip
        self.cu = torch.arange(n + 1, dtype=torch.int32, device=dev)  # one row per sequence
        self.rows = torch.arange(n, device=dev)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        if dev.type == "cuda":
            self._capture_all()

    def fits(self, batch_size: int) -> bool:
        return batch_size <= self.sizes[-1]

    def _forward(self, b: int) -> torch.Tensor:
        """The step a graph records: [b] tokens -> [b, V] logits, all from the static buffers."""
        positions, bs = self.positions[:b], self.block_size
        io = {}
        for kind in self.kinds:
            table = self.tables[kind][:b]
            slots = table[self.rows[:b], positions // bs].long() * bs + positions % bs  # [b]
            # cu_seqlens and q_start are for the prefill kernel; a decode step reads seq_lens
            lens = self.seq_lens[:b]
            io[kind] = PagedIO(slots, table, self.cu[: b + 1], lens, lens, max_seqlen_q=1)
        hidden = self.model.forward_batch(self.tokens[:b], positions, [], self.kv, io)
        return self.model.logits(hidden)

    @torch.inference_mode()
    def _capture_all(self) -> None:
        """Largest first, so smaller graphs reuse its memory pool. Buffers hold padding only:
        every slot is negative, nothing is written to the cache while capturing."""
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

    def run(self, tokens: list[int], positions: list[int], tables: dict[str, torch.Tensor]):
        """One decode step of len(tokens) sequences. tables[kind] [B, width] int32 on the host
        (width <= max_blocks). Returns logits [B, V] on the device."""
        B = len(tokens)
        b = next(s for s in self.sizes if s >= B)
        dev = self.tokens.device
        pos = torch.tensor(positions, dtype=torch.long)
        self.tokens[:B].copy_(torch.tensor(tokens, dtype=torch.long).to(dev))
        self.positions[:B].copy_(pos.to(dev))
        self.seq_lens[:B].copy_((pos + 1).to(torch.int32).to(dev))
        for kind, table in tables.items():
            static = self.tables[kind]
            static[:B, : table.shape[1]].copy_(table.to(dev))
            static[:B, table.shape[1] :].fill_(-1)
        # rows B..b: padding, as the buffers were at capture (tables -1, lengths 1)
        self.tokens[B:b].zero_()
        self.positions[B:b].zero_()
        self.seq_lens[B:b].fill_(1)
        for static in self.tables.values():
            static[B:b].fill_(-1)
        if b in self.graphs:
            graph, logits = self.graphs[b]
            graph.replay()
            return logits[:B]
        with torch.inference_mode():
            return self._forward(b)[:B]
