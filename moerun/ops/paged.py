"""The paged K/V cache as one forward step sees it: the view the model's forward takes.

Every backend stores a step's new K/V into the cache first and then reads all keys a query can
see, cached and new, from the cache: one way to address K/V for prefill, decode, chunked
prefill and CUDA graphs alike. The engine owns the storage and plans the blocks; this module
only names what a step passes down, so `model` and `ops` never import `engine`.

Dims: N = new tokens of the step (all sequences, concatenated), B = sequences, K = kv heads,
d = head dim, bs = block size.
"""

from typing import NamedTuple

import torch


class SeqRows(NamedTuple):
    """One sequence's slice of a ragged batch: rows [row_start, row_end) hold positions
    [start, start + row_end - row_start)."""

    row_start: int
    row_end: int
    start: int


class StepRows(NamedTuple):
    """The step's ragged layout, as device tensors plus the host view the torch path loops on."""

    positions: torch.Tensor  # [N] int32 absolute position of each row
    seq_of_row: torch.Tensor  # [N] int32 sequence index b of each row
    cu_seqlens_q: torch.Tensor  # [B+1] int32: rows of sequence b are cu[b]:cu[b+1]
    q_start: torch.Tensor  # [B] int32 position of each sequence's first new token
    seq_lens: torch.Tensor  # [B] int32 q_start + new tokens
    max_seqlen_q: int  # 1: every sequence decodes one token (the split-context decode kernel)
    seqs: list[SeqRows]  # host copy of the layout; [] inside a captured CUDA graph


class Paging(NamedTuple):
    """One layer kind's addressing for one step (full and sliding layers have their own)."""

    slots: torch.Tensor  # [N] int64 cache slot of each new token, < 0 = not stored (padding)
    block_table: torch.Tensor  # [B, max_blocks] int32 logical -> physical block, -1 = none


class LayerKV(NamedTuple):
    """One layer's cache and this step's addressing into it."""

    k: torch.Tensor  # [num_blocks, bs, K, d], K after RoPE
    v: torch.Tensor
    paging: Paging


class StepCache(NamedTuple):
    """What a forward step reads and writes: per layer, the cache and its paging."""

    layers: list[LayerKV]
    rows: StepRows


def table_slots(
    table: torch.Tensor, seq: torch.Tensor, positions: torch.Tensor, block_size: int
) -> torch.Tensor:  # [N] int64
    """Cache slot of each new token: its sequence's block for the position, times the block
    size, plus the offset. table [B, max_blocks]; seq, positions [N]. A -1 block gives a
    negative slot: the token is not stored."""
    return table[seq, positions // block_size].long() * block_size + positions % block_size


def step_rows(seqs: list[SeqRows], positions: torch.Tensor, device: torch.device) -> StepRows:
    """The device tensors of a ragged step from its host layout (one small copy each)."""
    i32 = lambda xs: torch.tensor(xs, dtype=torch.int32).to(device)  # noqa: E731
    counts = [r1 - r0 for r0, r1, _ in seqs]
    seq_of_row = torch.repeat_interleave(torch.arange(len(seqs), dtype=torch.int32),
                                         torch.tensor(counts))  # fmt: skip
    return StepRows(
        positions,
        seq_of_row.to(device),
        i32([0] + [r1 for _, r1, _ in seqs]),
        i32([start for _, _, start in seqs]),
        i32([start + n for (_, _, start), n in zip(seqs, counts, strict=True)]),
        max(counts),
        seqs,
    )


def scratch_cache(
    num_layers: int, tokens: int, kv_heads: int, head_dim: int, dtype: torch.dtype,
    device: torch.device, block_size: int = 16,
) -> StepCache:  # fmt: skip
    """A throwaway cache for one sequence computed whole from position 0 (scoring, oracle
    tests): one buffer shared by every layer, since a layer reads its K/V only inside its own
    attention, and an identity block table."""
    blocks = -(-tokens // block_size)
    k = torch.empty(blocks, block_size, kv_heads, head_dim, dtype=dtype, device=device)
    v = torch.empty_like(k)
    positions = torch.arange(tokens, dtype=torch.int32, device=device)
    table = torch.arange(blocks, dtype=torch.int32, device=device)[None, :]  # [1, blocks]
    paging = Paging(positions.long(), table)  # slot of position p is p
    rows = step_rows([SeqRows(0, tokens, 0)], positions, device)
    return StepCache([LayerKV(k, v, paging)] * num_layers, rows)
