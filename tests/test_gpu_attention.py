"""Triton paged attention (and K/V write) kernels against the torch oracles
(moerun.ops.attention.sink_attention, moerun.ops.attention.apply_rope).

Without CUDA the kernels run in the Triton interpreter on CPU tensors (tiny shapes: it is slow).
Tolerance: in fp32 both sides compute the same sums in a different order (online softmax over
tiles vs one softmax), so they agree to a few fp32 ulps of O(1) values: <= 5e-7 on these cases,
<= 2.4e-6 over a 60-case random sweep of shapes and tiles. 1e-5 leaves that margin and still
catches any wrong mask, weight or sink (those move outputs by >= 1e-3 here).
"""

import os

import pytest
import torch
from torch import Tensor

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # must be set before triton is imported
pytest.importorskip("triton")

from moerun.ops.attention import (
    apply_rope,  # noqa: E402
    sink_attention,  # noqa: E402
)
from moerun.ops.gpu.attention import paged_decode_attention, paged_prefill_attention  # noqa: E402
from moerun.ops.gpu.kv_write import RopeArgs, write_kv  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
TOL = dict(atol=1e-5, rtol=1e-5)
I32 = dict(dtype=torch.int32, device=DEV)


def paged_cache(
    lens: list[int], K: int, d: int, bs: int, window: int, first_pos: list[int],
    gen: torch.Generator, dtype: torch.dtype = torch.float32,
) -> tuple[list[tuple[Tensor, Tensor]], Tensor, Tensor, Tensor]:  # fmt: skip
    """Random K/V for sequences of lens[b] keys, scattered over shuffled physical blocks of a
    NaN-filled cache. With a window, blocks wholly older than first_pos[b] - window + 1 are
    freed: -1 in the table and NaN in the cache, so reading one poisons the output.
    Returns (keys, values) per sequence [L, K, d] fp32, k_cache, v_cache, block_table."""
    need = [-(-n // bs) for n in lens]
    perm = torch.randperm(sum(need) + 3, generator=gen)  # 3 spare blocks, never referenced
    # the caches are views one block into NaN storage: a kernel that dereferenced a -1 entry
    # would read NaN there instead of another tensor's memory
    k_cache = torch.full((len(perm) + 1, bs, K, d), float("nan"), dtype=dtype, device=DEV)[1:]
    v_cache = torch.full((len(perm) + 1, bs, K, d), float("nan"), dtype=dtype, device=DEV)[1:]
    table = torch.full((len(lens), max(need) + 1), -1, dtype=torch.int32)  # +1: padding column
    seqs, used = [], 0
    for b, n in enumerate(lens):
        k, v = torch.randn(n, K, d, generator=gen), torch.randn(n, K, d, generator=gen)
        seqs.append((k.to(dtype).float(), v.to(dtype).float()))
        table[b, : need[b]] = perm[used : used + need[b]]
        used += need[b]
        for j in range(n):  # slot = block * bs + offset
            k_cache[table[b, j // bs], j % bs] = k[j].to(dtype)
            v_cache[table[b, j // bs], j % bs] = v[j].to(dtype)
        oldest = max(0, first_pos[b] - window + 1) if window else 0
        for blk in range(oldest // bs):  # freed sliding blocks: poisoned, then unmapped
            k_cache[table[b, blk]] = v_cache[table[b, blk]] = float("nan")
            table[b, blk] = -1
    return seqs, k_cache, v_cache, table.to(DEV)


def oracle(
    q: Tensor, k: Tensor, v: Tensor, sinks: Tensor, sm_scale: float, window: int, q_pos: Tensor
) -> Tensor:
    """q [T, H, d] at positions q_pos over keys 0..L-1 -> [T, H, d] fp32."""
    T, H, d = q.shape
    K = k.shape[1]
    out = sink_attention(q.float().reshape(T, K, H // K, d), k, v, sinks.float(), sm_scale,
                         window, q_pos, torch.arange(k.shape[0]))  # fmt: skip
    return out.reshape(T, H, d)


def spread_sinks(H: int, gen: torch.Generator) -> Tensor:
    """Sinks from -8 (keys take nearly all the weight) to +8 (the sink does)."""
    return torch.linspace(-8, 8, H) + 0.1 * torch.randn(H, generator=gen)


PREFILL_CASES = [
    # d, K, G, bs, window, [(start, new queries)], block_m, block_n
    (16, 2, 2, 4, 0, [(0, 7)], None, None),  # from position 0, default tiles
    (32, 2, 3, 8, 5, [(0, 9), (6, 5), (13, 1)], 2, 8),  # window < block, G not a power of 2
    (16, 2, 4, 4, 6, [(11, 6), (2, 3)], 2, 8),  # window not a multiple of the block
    (64, 2, 2, 16, 20, [(3, 17), (30, 4)], 4, 16),  # windows spanning block edges
    (16, 2, 2, 4, 0, [(5, 10), (0, 3), (9, 2)], 4, 4),  # ragged, full attention
]


@pytest.mark.parametrize("case", PREFILL_CASES)
def test_prefill_matches_oracle(case: tuple) -> None:
    d, K, G, bs, window, seqs, block_m, block_n = case
    gen = torch.Generator().manual_seed(len(seqs) * 100 + d + window)
    starts, counts = [s for s, _ in seqs], [n for _, n in seqs]
    kv, k_cache, v_cache, table = paged_cache(
        [s + n for s, n in seqs], K, d, bs, window, starts, gen
    )
    q = torch.randn(sum(counts), K * G, d, generator=gen)
    sinks = spread_sinks(K * G, gen)
    cu = torch.tensor([0] + counts).cumsum(0)
    out = paged_prefill_attention(
        q.to(DEV), k_cache, v_cache, table, cu.to(**I32), torch.tensor(starts, **I32),
        sinks.to(DEV), 0.3, window, max_seqlen_q=max(counts), block_m=block_m, block_n=block_n,
    )  # fmt: skip
    assert not out.isnan().any()
    for b, (s, n) in enumerate(seqs):
        rows = slice(cu[b], cu[b + 1])
        ref = oracle(q[rows], *kv[b], sinks, 0.3, window, torch.arange(s, s + n))
        torch.testing.assert_close(out[rows].cpu(), ref, **TOL)


def test_prefill_bf16() -> None:
    """bf16 activations, fp32 softmax: within bf16 rounding of the fp32 oracle. (The
    interpreter rounds casts toward zero, so this bound is looser than a GPU needs.)"""
    gen = torch.Generator().manual_seed(7)
    d, K, G, bs, window = 32, 2, 2, 4, 6
    kv, k_cache, v_cache, table = paged_cache([12], K, d, bs, window, [4], gen, torch.bfloat16)
    q = torch.randn(8, K * G, d, generator=gen).to(torch.bfloat16)
    sinks = spread_sinks(K * G, gen).to(torch.bfloat16)
    out = paged_prefill_attention(q.to(DEV), k_cache, v_cache, table, torch.tensor([0, 8], **I32),
                                  torch.tensor([4], **I32), sinks.to(DEV), 0.2, window,
                                  block_m=4, block_n=8)  # fmt: skip
    assert out.dtype == torch.bfloat16
    ref = oracle(q, *kv[0], sinks, 0.2, window, torch.arange(4, 12))
    torch.testing.assert_close(out.cpu().float(), ref, atol=3e-2, rtol=3e-2)


DECODE_CASES = [
    # d, K, G, bs, window, seq_lens, num_splits, block_n
    (16, 2, 2, 4, 0, [3, 11, 1], 1, 4),  # contexts shorter than a block, one split
    (16, 2, 3, 4, 6, [3, 11, 14], 3, 4),  # several splits, freed blocks, G not a power of 2
    (64, 2, 4, 16, 20, [5, 40], 4, 16),  # empty splits on the short sequence
    (32, 2, 2, 8, 0, [9, 30], None, None),  # default splits and tiles
]


@pytest.mark.parametrize("case", DECODE_CASES)
def test_decode_matches_oracle(case: tuple) -> None:
    d, K, G, bs, window, lens, splits, block_n = case
    gen = torch.Generator().manual_seed(sum(lens) + d)
    kv, k_cache, v_cache, table = paged_cache(lens, K, d, bs, window, [n - 1 for n in lens], gen)
    q = torch.randn(len(lens), K * G, d, generator=gen)
    sinks = spread_sinks(K * G, gen)
    out = paged_decode_attention(q.to(DEV), k_cache, v_cache, table, torch.tensor(lens, **I32),
                                 sinks.to(DEV), 0.3, window, num_splits=splits,
                                 block_n=block_n).cpu()  # fmt: skip
    assert not out.isnan().any()
    for b, n in enumerate(lens):
        ref = oracle(q[b : b + 1], *kv[b], sinks, 0.3, window, torch.tensor([n - 1]))
        torch.testing.assert_close(out[b : b + 1], ref, **TOL)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_write_kv_with_rope(dtype: torch.dtype) -> None:
    """k (rotated) and v land in their slots, slot -1 writes nothing, q is rotated in place."""
    gen = torch.Generator().manual_seed(3)
    N, K, H, d, bs = 5, 2, 6, 16, 4
    k, v, q = (torch.randn(n, h, d, generator=gen).to(dtype) for n, h in [(N, K), (N, K), (N, H)])
    cos, sin = (1.3 * torch.randn(N, d // 2, generator=gen) for _ in range(2))
    slots = torch.tensor([3, -1, 7, 0, 13])
    k_cache = torch.zeros(4, bs, K, d, dtype=dtype, device=DEV)
    v_cache = torch.zeros_like(k_cache)
    q_dev = q.to(DEV, copy=True)  # rotated in place; q stays the input
    write_kv(k.to(DEV), v.to(DEV), k_cache, v_cache, slots.to(DEV),
             RopeArgs(q_dev, cos.to(DEV), sin.to(DEV)))  # fmt: skip
    # bf16 on a GPU matches apply_rope bit for bit (every op rounded as torch rounds); fp32 may
    # differ in the last bit (the GPU may fuse a multiply-add); the interpreter truncates bf16
    # casts instead of rounding them to nearest, so bf16 there is within a couple of ulps
    if dtype == torch.float32:
        tol = dict(atol=1e-6, rtol=1e-6)
    else:
        tol = dict(atol=0, rtol=0) if DEV == "cuda" else dict(atol=2e-1, rtol=3e-2)
    torch.testing.assert_close(q_dev.cpu(), apply_rope(q, cos, sin), **tol)
    flat_k, flat_v = k_cache.cpu().view(-1, K, d), v_cache.cpu().view(-1, K, d)
    ok = slots >= 0
    torch.testing.assert_close(flat_k[slots[ok]], apply_rope(k, cos, sin)[ok], **tol)
    assert torch.equal(flat_v[slots[ok]], v[ok])
    untouched = torch.ones(len(flat_k), dtype=torch.bool)
    untouched[slots[ok]] = False
    assert not flat_k[untouched].any() and not flat_v[untouched].any()


def test_write_kv_without_rope() -> None:
    gen = torch.Generator().manual_seed(4)
    k, v = torch.randn(4, 2, 32, generator=gen), torch.randn(4, 2, 32, generator=gen)
    k_cache = torch.zeros(3, 8, 2, 32, device=DEV)
    v_cache = torch.zeros_like(k_cache)
    slots = torch.tensor([-1, 20, 2, 9])
    write_kv(k.to(DEV), v.to(DEV), k_cache, v_cache, slots.to(DEV))
    flat_k, flat_v = k_cache.cpu().view(-1, 2, 32), v_cache.cpu().view(-1, 2, 32)
    assert torch.equal(flat_k[slots[1:]], k[1:]) and torch.equal(flat_v[slots[1:]], v[1:])
    assert flat_k.abs().sum() == k[1:].abs().sum()  # nothing else written
