"""Triton MoE kernels (moerun.ops.gpu) against the torch reference (moerun.ops.moe).

Without CUDA the kernels run under the Triton interpreter on CPU tensors, in fp32 (the
interpreter's bf16 dot is unusable); on a GPU they run for real on bf16 activations.
"""

import math
import os

import pytest
import torch

if not torch.cuda.is_available():
    # must precede the first import of triton: @triton.jit picks the interpreter at decoration
    os.environ["TRITON_INTERPRET"] = "1"
pytest.importorskip("triton")
import triton  # noqa: E402

from moerun.ops.backend import resolve_ops  # noqa: E402
from moerun.ops.experts import ExpertWeights  # noqa: E402
from moerun.ops.gpu import moe_align as moe_align_module  # noqa: E402
from moerun.ops.gpu.moe import grouped_mlp1, triton_moe  # noqa: E402
from moerun.ops.gpu.moe_align import max_tiles, moe_align, triton_route  # noqa: E402
from moerun.ops.moe import moe_experts, route, swiglu  # noqa: E402
from moerun.ops.mxfp4 import dequantize  # noqa: E402

GPU = torch.cuda.is_available()
DEV = "cuda" if GPU else "cpu"
DTYPE = torch.bfloat16 if GPU else torch.float32
LIMIT = 7.0
# Interpreter/fp32: kernel and reference differ only in summation order; over <= 96-term dot
# products the reordering error is ~96 * 2**-24 of the row's magnitude (~6e-6), so 1e-4 of the
# output's scale leaves margin yet any wrong nibble, scale, pair or gate is an O(1) error.
# GPU/bf16: activations rounded to bf16 (2**-9 relative) twice against an fp32 reference.
RTOL = 2e-2 if GPU else 1e-4

# the sigmoid of a very negative gate overflows exp to inf, which correctly gives 0
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")


def _close(got: torch.Tensor, want: torch.Tensor) -> None:
    """Elementwise, with an absolute floor relative to the tensor's largest magnitude."""
    want = want.float()
    torch.testing.assert_close(got.float(), want, rtol=RTOL, atol=RTOL * want.abs().max().item())


def _mxfp4(gen: torch.Generator, E: int, out: int, inp: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random packed weights holding every byte (so every nibble pair) and scales 120..130."""
    blocks = torch.randint(0, 256, (E, out, inp // 32, 16), dtype=torch.uint8, generator=gen)
    flat = blocks.view(-1)
    flat[:256] = torch.randperm(256, generator=gen).to(torch.uint8)  # all 16x16 nibble pairs
    scales = torch.randint(120, 131, (E, out, inp // 32), dtype=torch.uint8, generator=gen)
    scales.view(-1)[:2] = torch.tensor([120, 130], dtype=torch.uint8)  # both edges present
    return blocks.to(DEV), scales.to(DEV)


def _weights(seed: int, E: int, D: int, I: int) -> ExpertWeights:
    gen = torch.Generator().manual_seed(seed)
    b1, s1 = _mxfp4(gen, E, 2 * I, D)
    b2, s2 = _mxfp4(gen, E, D, I)
    bias1 = (torch.randn(E, 2 * I, generator=gen) * 0.5).to(DEV, DTYPE)
    bias2 = torch.randn(E, D, generator=gen).to(DEV, DTYPE)
    return ExpertWeights(b1, s1, bias1, b2, s2, bias2)


def _inputs(seed: int, T: int, D: int, E: int, A: int, empty: int):
    """x [T, D] scaled so that the SwiGLU inputs straddle +-LIMIT; expert `empty` gets no row."""
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(T, D, generator=gen) * 0.02).to(DEV, DTYPE)
    logits = torch.randn(T, E, generator=gen)
    logits[:, empty] = float("-inf")
    ids, weights = route(logits, A)
    return x, ids.to(DEV), weights.to(DEV, DTYPE)


@pytest.mark.parametrize(
    ("T", "E", "k", "dtype"),
    [(1, 4, 1, torch.float32), (7, 8, 4, torch.float32), (13, 32, 4, torch.float32),
     (3, 6, 6, torch.float32), (5, 8, 2, torch.bfloat16)],
)  # fmt: skip
def test_route_matches_reference(T: int, E: int, k: int, dtype: torch.dtype) -> None:
    logits = torch.randn(T, E, generator=torch.Generator().manual_seed(T * E)).to(DEV, dtype)
    ids, weights = triton_route(logits, k)
    want_ids, want_weights = route(logits, k)
    assert ids.dtype == want_ids.dtype and weights.dtype == want_weights.dtype
    assert torch.equal(ids, want_ids)
    atol = 1e-6 if dtype == torch.float32 else 4e-3  # bf16: at most one rounding step apart
    torch.testing.assert_close(weights.float(), want_weights.float(), rtol=0, atol=atol)


@pytest.mark.parametrize("one_program", [True, False])
@pytest.mark.parametrize(
    ("T", "A", "E", "block_m"), [(1, 2, 4, 4), (7, 4, 8, 16), (13, 4, 8, 4), (3, 2, 64, 16)]
)
def test_align_groups_every_assignment_once(
    T: int, A: int, E: int, block_m: int, one_program: bool, monkeypatch
) -> None:
    monkeypatch.setattr(moe_align_module, "ONE_PROGRAM_PAIRS", 2**20 if one_program else 0)
    gen = torch.Generator().manual_seed(T + E)
    # distinct experts per token, never expert 1: one expert always has zero tokens
    ids = torch.stack([torch.randperm(E - 1, generator=gen)[:A] for _ in range(T)])
    ids = torch.where(ids >= 1, ids + 1, ids).to(DEV)
    rows, tile_expert, _ = moe_align(ids, E, block_m)
    rows, tile_expert, flat = rows.cpu().long(), tile_expert.cpu().long(), ids.cpu().reshape(-1)
    n = T * A
    assert tile_expert.numel() == max_tiles(n, E, block_m)
    assert rows.numel() == tile_expert.numel() * block_m
    # every assignment exactly once; everything else is the padding sentinel n
    real = rows < n
    assert torch.equal(rows[real].sort().values, torch.arange(n))
    assert bool((rows[~real] == n).all())
    counts = torch.bincount(flat, minlength=E)
    assert counts[1] == 0
    used = int(((counts + block_m - 1) // block_m).sum())
    assert bool((tile_expert[used:] == -1).all()) and bool((rows[used * block_m :] == n).all())
    assert bool((tile_expert[:used].diff() >= 0).all())  # tiles in expert order
    for j in range(used):
        tile = rows[j * block_m : (j + 1) * block_m]
        ok = tile < n
        # one expert per tile, real rows first (in increasing order), padding only at the end
        assert bool(ok[0]) and bool((ok.int().diff() <= 0).all())
        assert bool((flat[tile[ok]] == tile_expert[j]).all())
        assert bool((tile[ok].diff() > 0).all())


@pytest.mark.parametrize(("T", "A", "E", "block_m"), [(64, 4, 128, 16), (5, 4, 32, 16),
                                                     (33, 2, 4, 64), (16, 4, 128, 32)])  # fmt: skip
def test_align_one_program_equals_general_path(T, A, E, block_m, monkeypatch) -> None:
    """Decode batch shapes of 120b/20b, skewed routing (most tokens on a few experts)."""
    gen = torch.Generator().manual_seed(T * E)
    skew = 1 / torch.arange(1, E + 1, dtype=torch.float64) ** 2  # distinct experts per token
    ids = torch.stack([torch.multinomial(skew, A, generator=gen) for _ in range(T)]).to(DEV)
    pairs = triton.next_power_of_2(T * A) * triton.next_power_of_2(E)
    assert pairs <= moe_align_module.ONE_PROGRAM_PAIRS  # the one-program path runs first
    fast = moe_align(ids, E, block_m)
    monkeypatch.setattr(moe_align_module, "ONE_PROGRAM_PAIRS", 0)
    general = moe_align(ids, E, block_m)
    assert torch.equal(fast.rows.cpu(), general.rows.cpu())
    assert torch.equal(fast.tile_expert.cpu(), general.tile_expert.cpu())


def test_mlp1_stage_matches_reference() -> None:
    """Gather + MXFP4 GEMM + bias + SwiGLU, per padded row, against dequantize + swiglu."""
    T, D, I, E, A = 13, 64, 64, 8, 4
    w = _weights(1, E, D, I)
    x, ids, _ = _inputs(2, T, D, E, A, empty=5)
    al = moe_align(ids, E, 16)
    act = grouped_mlp1(x, al, A, w, LIMIT)  # [max_tiles * 16, I]
    pos = (al.rows < T * A).nonzero().squeeze(1)  # padded positions of real assignments
    row = al.rows[pos].long()
    e = ids.reshape(-1)[row]
    w1 = dequantize(w.mlp1_blocks, w.mlp1_scales, torch.float32)[e]  # [P, 2I, D]
    h = torch.einsum("pd,pod->po", x[row // A].float(), w1) + w.mlp1_bias[e].float()  # [P, 2I]
    # the data must exercise both clamps and the unclamped range
    assert bool((h[:, ::2] > LIMIT).any()) and bool((h[:, 1::2] < -LIMIT).any())
    assert (h.abs() < LIMIT).float().mean() > 0.5
    _close(act[pos], swiglu(h, LIMIT))


# (gate, linear) -> swiglu in float64: values from MODEL_SPEC.md §2.6, then gates below -limit,
# which must not be clamped from below (a clamp at -7 would give -3.3e-4 instead of -6.8e-5)
SPEC_SWIGLU = [(10.0, -9.0, -41.99971876981991), (-10.0, 9.0, -3.2463690358842494e-06),
               (1.0, 0.5, 1.268693648899232), (-3.0, -0.5, -0.009035654853892985)]  # fmt: skip
SPEC_SWIGLU += [(g, v, g / (1 + math.exp(-1.702 * g)) * (v + 1)) for g, v in [(-20, 0), (-8, 6)]]


def test_swiglu_epilogue_spec_values() -> None:
    """x = 0 makes the GEMM output the bias alone, so the epilogue sees exact (gate, linear)."""
    E, D, I, A = 2, 64, 32, 2
    w = _weights(4, E, D, I)
    pairs = torch.tensor([(g, lin) for g, lin, _ in SPEC_SWIGLU])  # [P, 2]
    bias1 = torch.zeros(E, I, 2)  # [E, I, 2] -> [E, 2I]: gate/linear interleaved
    bias1[:, : len(pairs)] = pairs
    w = w._replace(mlp1_bias=bias1.reshape(E, 2 * I).to(DEV, DTYPE))
    ids = torch.tensor([[0, 1]], device=DEV)
    act = grouped_mlp1(torch.zeros(1, D, device=DEV, dtype=DTYPE), moe_align(ids, E, 16), A, w, 7.0)
    got = act[[0, 16], : len(pairs)].double()  # expert 0's and expert 1's single row
    want = torch.tensor([out for _, _, out in SPEC_SWIGLU], dtype=torch.float64, device=DEV)
    rtol = 1e-2 if GPU else 1e-5  # bf16 output rounding / fp32 exp
    torch.testing.assert_close(got, want.expand_as(got), rtol=rtol, atol=1e-30)


@pytest.mark.parametrize(
    ("T", "D", "I", "E", "A", "block_m"),
    [(1, 64, 32, 4, 2, 16), (3, 64, 64, 8, 4, 16), (7, 64, 32, 4, 2, 32),
     (13, 96, 96, 6, 3, 16), (5, 256, 160, 8, 4, 32)],
)  # fmt: skip
def test_moe_matches_reference(T: int, D: int, I: int, E: int, A: int, block_m: int) -> None:
    w = _weights(T, E, D, I)
    x, ids, weights = _inputs(T + 1, T, D, E, A, empty=E // 2)
    got = triton_moe(x, ids, weights, w, LIMIT, block_m=block_m)
    assert got.shape == (T, D) and got.dtype == x.dtype
    _close(got, moe_experts(x.float(), ids, weights.float(), w, LIMIT))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_residual_in_the_sum_kernel_equals_adding_after(dtype: torch.dtype) -> None:
    """x + moe(x) fused into the last kernel: bit for bit what the separate add gives (the
    MoE output rounded to the activation dtype first, then one rounded add)."""
    T, D, I, E, A = 9, 64, 64, 8, 4
    w = _weights(5, E, D, I)
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(T, D, generator=gen).to(DEV, dtype)
    res = (100 * torch.randn(T, D, generator=gen)).to(DEV, dtype)  # large: rounding matters
    ids, weights = route(torch.randn(T, E, generator=gen).to(DEV, dtype), A)
    alone = triton_moe(x, ids, weights, w, LIMIT)
    fused = triton_moe(x, ids, weights, w, LIMIT, residual=res)
    assert torch.equal(fused, res + alone)
    ops = resolve_ops("triton", DEV)  # what the model calls on this backend
    assert torch.equal(ops.moe(x, ids, weights, w, LIMIT, residual=res), fused)


def test_moe_no_tokens() -> None:
    w = _weights(0, 4, 64, 32)
    x, ids, weights = _inputs(0, 0, 64, 4, 2, empty=0)
    assert triton_moe(x, ids, weights, w, LIMIT).shape == (0, 64)


@pytest.mark.skipif(not GPU, reason="host syncs only exist with CUDA")
def test_no_host_sync() -> None:
    T, D, I, E, A = 7, 64, 64, 8, 4
    w = _weights(3, E, D, I)
    x = torch.randn(T, D, device=DEV, dtype=DTYPE)
    logits = torch.randn(T, E, device=DEV, dtype=DTYPE)
    triton_moe(x, *triton_route(logits, A), w, LIMIT)  # compile outside the checked region
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any synchronising torch op now raises
    try:
        triton_moe(x, *triton_route(logits, A), w, LIMIT)
    finally:
        torch.cuda.set_sync_debug_mode("default")
