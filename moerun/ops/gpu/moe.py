"""Grouped MXFP4 expert GEMMs in Triton: the CUDA counterpart of `moerun.ops.moe.moe_experts`.

Per tile of BLOCK_M assignments of one expert (see `moe_align`):
  mlp1: gather token rows of x, multiply by the expert's mlp1 weights decoded from MXFP4 inside
        the kernel, + bias, clamped SwiGLU over the interleaved gate/linear pairs -> act [rows, I];
  mlp2: act @ decoded mlp2 weights + bias, times the routing weight -> y [T*A, D] fp32;
  then a small kernel sums the A rows of each token in fixed order -> out [T, D].
Dequantized weights never exist in memory: each [rows, BLOCK_K] weight tile is decoded in
registers (BLOCK_K is a multiple of 32, so a tile holds whole MXFP4 blocks).
"""

import os

import torch
import triton
import triton.language as tl

from moerun.ops.experts import SWIGLU_ALPHA, ExpertWeights
from moerun.ops.gpu.moe_align import MoeAlignment, moe_align

MX_BLOCK = 32  # elements per MXFP4 scale


@triton.jit
def _e2m1(code):
    """4-bit E2M1 codes (any int dtype) -> fp32 values (spec §3.1), by building the fp32 bits."""
    c = code.to(tl.int32)
    exp = (c >> 1) & 3
    man = c & 1
    normal = (((exp + 126) << 23) | (man << 22)).to(tl.float32, bitcast=True)  # 2^(e-1)*(1+m/2)
    mag = tl.where(exp == 0, man.to(tl.float32) * 0.5, normal)  # exponent 0: subnormal 0 / 0.5
    return tl.where((c & 8) != 0, -mag, mag)


@triton.jit
def _mxfp4_tile(blocks_row, scales_row, row_ok, k0, K, R: tl.constexpr, BLOCK_K: tl.constexpr):
    """Decode weight rows [R] x columns [k0, k0 + BLOCK_K) -> fp32 [R, BLOCK_K].

    blocks_row / scales_row: per-row pointers [R] to a row's K/2 packed bytes and K/32 scales.
    """
    kb = k0 // 2 + tl.arange(0, BLOCK_K // 2)
    packed = tl.load(
        blocks_row[:, None] + kb[None, :], mask=row_ok[:, None] & (kb[None, :] < K // 2), other=0
    )  # [R, BLOCK_K/2] uint8, contiguous along K
    # join -> [R, BLOCK_K/2, 2] -> [R, BLOCK_K]: element 2j = low nibble, 2j+1 = high nibble
    vals = tl.reshape(tl.join(_e2m1(packed & 0xF), _e2m1(packed >> 4)), [R, BLOCK_K])
    kg = k0 // 32 + tl.arange(0, BLOCK_K // 32)
    s = tl.load(
        scales_row[:, None] + kg[None, :], mask=row_ok[:, None] & (kg[None, :] < K // 32), other=127
    )  # [R, BLOCK_K/32] uint8
    # E8M0 byte s as fp32 exponent bits = 2**(s - 127), exact for s in 1..254
    scale = (s.to(tl.int32) << 23).to(tl.float32, bitcast=True)
    vals = tl.reshape(vals, [R, BLOCK_K // 32, 32]) * scale[:, :, None]  # one scale per block
    return tl.reshape(vals, [R, BLOCK_K])


@triton.jit
def _mxfp4_matmul(
    a_ptr, a_rows, a_ok, blocks_row, scales_row, w_ok, K,
    BLOCK_M: tl.constexpr, R: tl.constexpr, BLOCK_K: tl.constexpr, DOT_FP32: tl.constexpr,
):  # fmt: skip
    """a[a_rows, :K] @ W[rows, :K].T with W decoded from MXFP4 -> fp32 [BLOCK_M, R]."""
    acc = tl.zeros([BLOCK_M, R], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kx = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(
            a_ptr + a_rows[:, None] * K + kx[None, :],
            mask=a_ok[:, None] & (kx[None, :] < K),
            other=0.0,
        )  # [BLOCK_M, BLOCK_K]
        w = tl.trans(_mxfp4_tile(blocks_row, scales_row, w_ok, k0, K, R, BLOCK_K))  # [BK, R]
        if DOT_FP32:  # fp32 activations, or the interpreter (its bf16 dot is wrong)
            acc = tl.dot(a.to(tl.float32), w, acc, input_precision="ieee")
        else:  # MXFP4 values are exact in bf16/fp16: tensor-core dot, fp32 accumulation
            acc = tl.dot(a, w.to(a.dtype), acc)
    return acc


@triton.jit
def _mlp1_kernel(
    x_ptr, rows_ptr, tile_expert_ptr, blocks_ptr, scales_ptr, bias_ptr, act_ptr,
    N, A, D, I, limit, alpha,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DOT_FP32: tl.constexpr,
):  # fmt: skip
    """Grid (tiles, I / BLOCK_N): act[pos, units] = swiglu(x[token] @ W1[e].T + b1[e])."""
    tile = tl.program_id(0)
    e = tl.load(tile_expert_ptr + tile).to(tl.int64)
    if e < 0:  # beyond the last used tile: the grid is sized by the host-side bound
        return
    pos = tile * BLOCK_M + tl.arange(0, BLOCK_M)  # padded positions
    rows = tl.load(rows_ptr + pos)
    ok = rows < N  # padding rows hold N
    tokens = (rows // A).to(tl.int64)
    # 2*BLOCK_N interleaved weight rows: gate/linear of units pid*BLOCK_N .. +BLOCK_N
    wr = tl.program_id(1) * 2 * BLOCK_N + tl.arange(0, 2 * BLOCK_N)
    w_ok = wr < 2 * I
    wrow = e * 2 * I + wr  # [2*BLOCK_N] row of the flattened [E*2I, D] weight matrix
    acc = _mxfp4_matmul(
        x_ptr, tokens, ok, blocks_ptr + wrow * (D // 2), scales_ptr + wrow * (D // 32), w_ok, D,
        BLOCK_M, 2 * BLOCK_N, BLOCK_K, DOT_FP32,
    )  # fmt: skip
    acc += tl.load(bias_ptr + wrow, mask=w_ok, other=0.0).to(tl.float32)[None, :]
    # [BLOCK_M, 2*BLOCK_N] -> [BLOCK_M, BLOCK_N, 2] -> even (gate) and odd (linear) columns
    gate, lin = tl.split(tl.reshape(acc, [BLOCK_M, BLOCK_N, 2]))
    gate = tl.minimum(gate, limit)  # gate: clamped from above only
    lin = tl.minimum(tl.maximum(lin, -limit), limit)
    out = gate * tl.sigmoid(alpha * gate) * (lin + 1.0)
    units = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    tl.store(
        act_ptr + pos[:, None].to(tl.int64) * I + units[None, :],
        out.to(act_ptr.dtype.element_ty),
        mask=ok[:, None] & (units[None, :] < I),
    )


@triton.jit
def _mlp2_kernel(
    act_ptr, rows_ptr, tile_expert_ptr, gates_ptr, blocks_ptr, scales_ptr, bias_ptr, y_ptr,
    N, D, I,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DOT_FP32: tl.constexpr,
):  # fmt: skip
    """Grid (tiles, D / BLOCK_N): y[row] = gate[row] * (act[pos] @ W2[e].T + b2[e]), fp32."""
    tile = tl.program_id(0)
    e = tl.load(tile_expert_ptr + tile).to(tl.int64)
    if e < 0:
        return
    pos = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    rows = tl.load(rows_ptr + pos)
    ok = rows < N
    wr = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)  # output features
    w_ok = wr < D
    wrow = e * D + wr  # row of the flattened [E*D, I] weight matrix
    acc = _mxfp4_matmul(
        act_ptr, pos.to(tl.int64), ok, blocks_ptr + wrow * (I // 2), scales_ptr + wrow * (I // 32),
        w_ok, I, BLOCK_M, BLOCK_N, BLOCK_K, DOT_FP32,
    )  # fmt: skip
    acc += tl.load(bias_ptr + wrow, mask=w_ok, other=0.0).to(tl.float32)[None, :]
    acc *= tl.load(gates_ptr + rows, mask=ok, other=0.0).to(tl.float32)[:, None]
    tl.store(
        y_ptr + rows[:, None].to(tl.int64) * D + wr[None, :], acc, mask=ok[:, None] & w_ok[None, :]
    )


@triton.jit
def _sum_slots_kernel(y_ptr, res_ptr, out_ptr, D, A: tl.constexpr, BLOCK_D: tl.constexpr,
                      HAS_RES: tl.constexpr):  # fmt: skip
    """Grid (T, D / BLOCK_D): out[t] = sum_a y[t*A + a], fp32, rounded once; with a residual,
    out[t] = res[t] + that rounded sum, rounded again (= `x + moe(x)` in torch)."""
    t = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    ok = cols < D
    acc = tl.zeros([BLOCK_D], tl.float32)
    for a in tl.static_range(A):
        acc += tl.load(y_ptr + (t * A + a) * D + cols, mask=ok, other=0.0)
    dt = out_ptr.dtype.element_ty
    if HAS_RES:
        res = tl.load(res_ptr + t * D + cols, mask=ok, other=0.0).to(tl.float32)
        acc = acc.to(dt).to(tl.float32) + res
    tl.store(out_ptr + t * D + cols, acc.to(dt), mask=ok)


def _pick_block_m(n: int, num_experts: int) -> int:
    """Rows per tile: small tiles when experts get few rows (decode), 64 for prefill."""
    per_expert = n / max(1, min(n, num_experts))
    return 16 if per_expert <= 16 else 32 if per_expert <= 32 else 64


def triton_moe(
    x: torch.Tensor,  # [T, D] normed activations
    expert_ids: torch.Tensor,  # [T, A]
    expert_weights: torch.Tensor,  # [T, A]
    w: ExpertWeights,
    limit: float,
    block_m: int | None = None,
    residual: torch.Tensor | None = None,  # [T, D] added to the result in the sum's kernel
) -> torch.Tensor:  # [T, D], x's dtype
    """Same contract as `moerun.ops.moe.moe_experts`, on the device and without host syncs.

    Intermediate activations are kept in x's dtype (as the reference does); the routing-weighted
    sum over the A experts is accumulated in fp32 and rounded once.
    """
    T, D = x.shape
    E, two_i = w.mlp1_blocks.shape[:2]
    I = two_i // 2
    A = expert_ids.shape[1]
    if w.mlp1_blocks.shape[2] * MX_BLOCK != D or w.mlp2_blocks.shape[1:3] != (D, I // MX_BLOCK):
        raise ValueError(f"expert weights do not match x [{T}, {D}] / I={I}")
    if not all(t.is_contiguous() for t in w):  # the kernels index the packed layout directly
        raise ValueError("expert weights must be contiguous")
    out = torch.empty_like(x)
    if T == 0:
        return out
    n = T * A
    bm = block_m or _pick_block_m(n, E)
    if bm < 16 or bm & (bm - 1):
        raise ValueError(f"block_m must be a power of two >= 16 (tensor-core dot), got {bm}")
    al = moe_align(expert_ids, E, bm)
    act = grouped_mlp1(x.contiguous(), al, A, w, limit)  # [max_tiles*bm, I], x's dtype
    # Scratch y [T*A, D] fp32 + a fixed-order sum rather than fp32 atomics into [T, D]: the
    # result is bit-reproducible run to run (atomics add in arbitrary order), no zero-fill is
    # needed, and the cost, T*A*D*4 bytes written and read once, is negligible at decode and
    # of the order of one activation pass at prefill.
    y = torch.empty(n, D, dtype=torch.float32, device=x.device)
    gates = expert_weights.reshape(-1).contiguous()  # [N], row r = token r // A, slot r % A
    grouped_mlp2(act, al, gates, w, y)
    block_d = min(1024, triton.next_power_of_2(D))
    res = residual.contiguous() if residual is not None else out  # unread without HAS_RES
    _sum_slots_kernel[(T, triton.cdiv(D, block_d))](
        y, res, out, D, A=A, BLOCK_D=block_d, HAS_RES=residual is not None
    )
    return out


def _dot_fp32(dtype: torch.dtype) -> bool:
    """fp32 operands for fp32 activations, and always under the Triton interpreter."""
    return dtype == torch.float32 or os.environ.get("TRITON_INTERPRET") == "1"


def _block_k(k: int) -> int:
    """K per loop step: whole MXFP4 blocks; a divisor of K when one fits, else a masked tail."""
    for bk in (128, 64):
        if k % bk == 0:
            return bk
    return min(128, max(MX_BLOCK, triton.next_power_of_2(k)))


def _tile_n(block_m: int, n: int) -> tuple[int, int]:
    """(BLOCK_N, num_warps) per row-tile size. Chosen so that no variant spills registers on
    sm_90 at K = 2880 (bench/gpu_aot.py compiles them: 158-241 registers, no spills, where the
    first choice, BLOCK_N 64/128 at 4 warps, spilled); decode tiles are narrower for more
    programs. Not yet timed on a GPU."""
    block_n, warps = (32, 4) if block_m <= 16 else (64, 8)
    return min(block_n, triton.next_power_of_2(n)), warps


def grouped_mlp1(
    x: torch.Tensor, al: MoeAlignment, A: int, w: ExpertWeights, limit: float
) -> torch.Tensor:
    """-> act [max_tiles * block_m, I] in x's dtype, indexed by padded position."""
    T, D = x.shape
    I = w.mlp1_blocks.shape[1] // 2
    act = torch.empty(al.rows.numel(), I, dtype=x.dtype, device=x.device)
    block_n, warps = _tile_n(al.block_m, I)  # units per program; 2x weight rows
    grid = (al.tile_expert.numel(), triton.cdiv(I, block_n))
    _mlp1_kernel[grid](
        x, al.rows, al.tile_expert, w.mlp1_blocks, w.mlp1_scales, w.mlp1_bias, act,
        T * A, A, D, I, float(limit), SWIGLU_ALPHA,
        BLOCK_M=al.block_m, BLOCK_N=block_n, BLOCK_K=_block_k(D), DOT_FP32=_dot_fp32(x.dtype),
        num_warps=warps,
    )  # fmt: skip
    return act


def grouped_mlp2(
    act: torch.Tensor, al: MoeAlignment, gates: torch.Tensor, w: ExpertWeights, y: torch.Tensor
) -> torch.Tensor:
    """Fills y [T*A, D] fp32 with gate * (act @ W2.T + b2) for every real assignment."""
    n, D = y.shape
    I = act.shape[1]
    block_n, warps = _tile_n(al.block_m, D)
    grid = (al.tile_expert.numel(), triton.cdiv(D, block_n))
    _mlp2_kernel[grid](
        act, al.rows, al.tile_expert, gates, w.mlp2_blocks, w.mlp2_scales, w.mlp2_bias, y,
        n, D, I,
        BLOCK_M=al.block_m, BLOCK_N=block_n, BLOCK_K=_block_k(I), DOT_FP32=_dot_fp32(act.dtype),
        num_warps=warps,
    )  # fmt: skip
    return y
