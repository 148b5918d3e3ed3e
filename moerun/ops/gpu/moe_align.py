"""MoE routing and token grouping on the device, with no host synchronisation (spec §2.6).

`triton_route` equals `moerun.ops.moe.route`; `moe_align` groups the T*A (token, slot)
assignments by expert into BLOCK_M-row tiles for the grouped GEMMs in `moe.py`.

Dims: T = tokens, A = active experts per token (top-k), E = experts, N = T*A assignments.
"""

from typing import NamedTuple

import torch
import triton
import triton.language as tl


@triton.jit
def _route_kernel(
    logits_ptr,  # [T, E]
    ids_ptr,  # [T, K] int64
    weights_ptr,  # [T, K], logits dtype
    E,
    K: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """One program per token: K rounds of argmax (ties -> lowest id), then softmax over the K."""
    t = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_E)
    valid = offs < E
    vals = tl.load(logits_ptr + t * E + offs, mask=valid, other=float("-inf")).to(tl.float32)
    slot = tl.arange(0, BLOCK_K)
    top_v = tl.full([BLOCK_K], float("-inf"), tl.float32)
    top_i = tl.zeros([BLOCK_K], tl.int32)
    # `free` rather than overwriting picked logits with -inf, so real -inf logits stay pickable
    free = valid
    for i in tl.static_range(K):
        m = tl.max(tl.where(free, vals, float("-inf")), axis=0)
        idx = tl.min(tl.where(free & (vals == m), offs, BLOCK_E), axis=0)
        top_v = tl.where(slot == i, m, top_v)
        top_i = tl.where(slot == i, idx, top_i)
        free = free & (offs != idx)
    used = slot < K
    # slot 0 holds the largest logit: the usual max-subtracted softmax, in fp32 like torch's
    p = tl.where(used, tl.exp(top_v - tl.max(top_v, axis=0)), 0.0)
    p = p / tl.sum(p, axis=0)
    tl.store(ids_ptr + t * K + slot, top_i.to(tl.int64), mask=used)
    tl.store(weights_ptr + t * K + slot, p.to(weights_ptr.dtype.element_ty), mask=used)


def triton_route(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Router logits [T, E] -> (expert ids [T, k] int64, weights [T, k] in logits' dtype).

    Same contract as `moerun.ops.moe.route`: top-k in descending order, softmax over the k.
    """
    T, E = logits.shape
    if not 1 <= k <= E:
        raise ValueError(f"top-k {k} outside 1..{E}")
    logits = logits.contiguous()
    ids = torch.empty(T, k, dtype=torch.int64, device=logits.device)
    weights = torch.empty(T, k, dtype=logits.dtype, device=logits.device)
    if T:
        _route_kernel[(T,)](
            logits,
            ids,
            weights,
            E,
            K=k,
            BLOCK_E=triton.next_power_of_2(E),
            BLOCK_K=triton.next_power_of_2(k),
        )
    return ids, weights


class MoeAlignment(NamedTuple):
    """Assignments grouped by expert: tile j covers padded positions [j*block_m, (j+1)*block_m)."""

    rows: torch.Tensor  # [max_tiles * block_m] int32: assignment r = t*A + a, or N = padding
    tile_expert: torch.Tensor  # [max_tiles] int32: expert of each tile, -1 = unused tile
    block_m: int


def max_tiles(n: int, num_experts: int, block_m: int) -> int:
    """Host-side bound on sum_e ceil(count_e / block_m), from shapes alone.

    At most min(n, E) experts are non-empty and each adds at most block_m - 1 padding rows.
    """
    return (n + min(n, num_experts) * (block_m - 1)) // block_m


# one program aligns at most this many (assignment, expert) pairs: decode batches (N = T*A up to
# 256 at E = 128) take one launch instead of the ~25 small torch ops of the general path
ONE_PROGRAM_PAIRS = 32768


@triton.jit
def _align_one_program(ids_ptr, rows_ptr, tile_expert_ptr, N, E, n_tiles,
                       BLOCK_M: tl.constexpr, N_PAD: tl.constexpr, E_PAD: tl.constexpr,
                       T_PAD: tl.constexpr, P_PAD: tl.constexpr):  # fmt: skip
    """moe_align in one program, through a one-hot [N, E] matrix instead of a sort: an
    assignment's place is its expert's first padded position plus the number of earlier
    assignments to the same expert (stable, as the general path's stable argsort)."""
    i = tl.arange(0, N_PAD)
    ok = i < N
    e = tl.load(ids_ptr + i, mask=ok, other=E_PAD).to(tl.int32)  # E_PAD matches no expert
    experts = tl.arange(0, E_PAD)
    onehot = (e[:, None] == experts[None, :]).to(tl.int32)  # [N_PAD, E_PAD]
    counts = tl.sum(onehot, axis=0)  # [E_PAD]
    tiles = (counts + BLOCK_M - 1) // BLOCK_M
    tile_end = tl.cumsum(tiles, axis=0)  # inclusive: tiles of experts 0..e
    pad_start = (tile_end - tiles) * BLOCK_M
    earlier = tl.cumsum(onehot, axis=0) - onehot  # [N_PAD, E_PAD]: same expert, before i
    dest = tl.sum(onehot * (pad_start[None, :] + earlier), axis=1)  # [N_PAD]
    p = tl.arange(0, P_PAD)
    tl.store(rows_ptr + p, tl.zeros([P_PAD], tl.int32) + N, mask=p < n_tiles * BLOCK_M)
    tl.debug_barrier()  # the padding fill lands before the scatter overwrites part of it
    tl.store(rows_ptr + dest, i, mask=ok)
    # tile t belongs to the number of experts whose tiles end at or before t (searchsorted)
    t = tl.arange(0, T_PAD)
    ended = (tile_end[None, :] <= t[:, None]) & (experts[None, :] < E)  # [T_PAD, E_PAD]
    owner = tl.sum(ended.to(tl.int32), axis=1)
    tl.store(tile_expert_ptr + t, tl.where(owner < E, owner, -1), mask=t < n_tiles)


def moe_align(expert_ids: torch.Tensor, num_experts: int, block_m: int) -> MoeAlignment:
    """expert_ids [T, A] -> per-expert row lists, each padded to a multiple of block_m.

    Small N (decode): one Triton program; otherwise device ops only (scatter_add, cumsum, stable
    argsort, searchsorted, scatter). Output sizes come from the host-side bound `max_tiles`, so
    nothing waits for the device. Within an expert the rows keep increasing order (stable), which
    keeps results reproducible; both paths give identical outputs.
    """
    dev = expert_ids.device
    flat = expert_ids.reshape(-1).long()  # [N]; assignment r belongs to token r // A
    n = flat.numel()
    n_tiles = max_tiles(n, num_experts, block_m)
    n_pad, e_pad = triton.next_power_of_2(max(n, 1)), triton.next_power_of_2(num_experts)
    if n and n_pad * e_pad <= ONE_PROGRAM_PAIRS:
        rows = torch.empty(n_tiles * block_m, dtype=torch.int32, device=dev)
        tile_expert = torch.empty(n_tiles, dtype=torch.int32, device=dev)
        _align_one_program[(1,)](
            flat, rows, tile_expert, n, num_experts, n_tiles, BLOCK_M=block_m, N_PAD=n_pad,
            E_PAD=e_pad, T_PAD=triton.next_power_of_2(n_tiles),
            P_PAD=triton.next_power_of_2(n_tiles * block_m), num_warps=8,
        )  # fmt: skip
        return MoeAlignment(rows, tile_expert, block_m)
    return _align_torch(flat, num_experts, block_m, n_tiles)


def _align_torch(flat: torch.Tensor, num_experts: int, block_m: int, n_tiles: int) -> MoeAlignment:
    """The general path: device ops only, any N."""
    dev, n = flat.device, flat.numel()
    counts = torch.zeros(num_experts, dtype=torch.int64, device=dev)
    counts.scatter_add_(0, flat, torch.ones_like(flat))  # bincount would sync on CUDA
    tiles = (counts + block_m - 1) // block_m  # [E] tiles per expert
    tile_end = torch.cumsum(tiles, 0)  # [E] exclusive end tile of each expert
    pad_start = (tile_end - tiles) * block_m  # [E] first padded position of each expert
    first = torch.cumsum(counts, 0) - counts  # [E] first sorted index of each expert
    order = torch.argsort(flat, stable=True)  # [N] sorted index -> assignment
    owner = flat[order]  # [N] expert of each sorted index
    dest = pad_start[owner] + torch.arange(n, device=dev) - first[owner]  # [N]
    rows = torch.full((n_tiles * block_m,), n, dtype=torch.int32, device=dev)
    rows.scatter_(0, dest, order.to(torch.int32))
    # tile j belongs to the first expert whose tile_end exceeds j; E means past the last one
    tile_ids = torch.arange(n_tiles, device=dev)
    tile_expert = torch.searchsorted(tile_end, tile_ids, right=True)  # [max_tiles]
    tile_expert = torch.where(tile_expert < num_experts, tile_expert, -1).to(torch.int32)
    return MoeAlignment(rows, tile_expert, block_m)
