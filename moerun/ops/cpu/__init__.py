"""CPU kernels that read MXFP4, bf16 and fp32 weights in place (y = x @ W.T + bias in fp32),
run a whole MoE layer, and attend over a paged K/V cache.

No weight matrix is ever converted: the C code decodes each 32-element MXFP4 block (or 16 bf16
values) into registers, reuses it for a tile of x rows, and accumulates in fp32. The library is
compiled on first use (build.py); without a working compiler available() is False, one warning
line goes to stderr, and callers keep the torch path. The best variant the CPU runs is the
default (avx512, then avx2+fma, then portable C); MOERUN_CPU_KERNEL=avx2|scalar (read when the
library loads) or variant=... picks another. The SIMD paths copy x per call (permuted or
packed: activations, never weights), and the AVX-512 prefill path decodes 12 weight rows at a
time into a per-thread fp32 scratch.

Batch invariance: within a variant, every kernel computes each output row in one order that
depends neither on how many rows share the call nor on the thread count, so a row's result is
the same bits alone or in any batch (tests/test_cpu_kernels.py, tests/test_cpu_attention.py).

Dims: n = x rows, N = output features, K = input features, G = K / 32 MXFP4 blocks per row.
"""

from typing import TYPE_CHECKING

import torch

from moerun.ops.cpu.dense import bf16_linear, f32_linear, int8_linear, rms_norm
from moerun.ops.cpu.library import (
    _BIAS_KINDS,
    _bias,
    _check,
    _quantize,
    _setup,
    available,
    has_bf16dot,
    has_vnni,
    uses_bf16dot,
    variant,
    variants,
)

if TYPE_CHECKING:
    from moerun.ops.experts import ExpertWeights

__all__ = ["available", "bf16_linear", "f32_linear", "has_bf16dot", "has_vnni", "int8_linear",
           "moe_experts", "mxfp4_linear", "paged_attention", "rms_norm", "uses_bf16dot", "variant",
           "variants"]  # fmt: skip


def mxfp4_linear(
    x: torch.Tensor,  # [n, K] float32
    blocks: torch.Tensor,  # [N, G, 16] uint8
    scales: torch.Tensor,  # [N, G] uint8
    bias: torch.Tensor | None = None,  # [N] bf16 or fp32
    *,
    variant: str | None = None,
    threads: int | None = None,
    quantize_x: bool = False,
) -> torch.Tensor:  # [n, N] float32
    """x @ W.T + bias for one expert's MXFP4 weight W (logical [N, K], spec §3.1), read packed:
    element 2j of a block is the low nibble of byte j, value = E2M1(code) * 2**(scale - 127).

    quantize_x: on the avx512 variant of a CPU with VNNI, round x to 16 bits per 32-element
    block and use integer dot products for n <= 4 (mxfp4_vnni.c; measured 1.4x the float
    kernel's decode speed), their exact fp32 twin beyond (mxfp4_q16.c); for bf16 activations
    only; otherwise ignored. Either way each row of y is the same bits whatever n is and
    whatever the other rows are."""
    dll, simd, nthreads = _setup(variant, threads)
    assert x.dim() == 2 and blocks.dim() == 3, f"x {tuple(x.shape)}, blocks {tuple(blocks.shape)}"
    N, G, B = blocks.shape
    n, K = x.shape
    assert B == 16 and K == 32 * G, f"x {tuple(x.shape)} does not match blocks {(N, G, B)}"
    assert scales.shape == (N, G), f"scales {tuple(scales.shape)} do not match blocks"
    _check(x, "x", torch.float32)
    _check(blocks, "blocks", torch.uint8)
    _check(scales, "scales", torch.uint8)
    bias_ptr, bias_kind = _bias(bias, N)
    y = torch.empty(n, N, dtype=torch.float32)
    if n and N:
        args = (x.data_ptr(), blocks.data_ptr(), scales.data_ptr(), bias_ptr, bias_kind)
        if _quantize(quantize_x, simd):
            rc = dll.moerun_mxfp4_linear_q16(*args, y.data_ptr(), n, N, K, nthreads)
        else:
            rc = dll.moerun_mxfp4_linear(*args, y.data_ptr(), n, N, K, nthreads, simd)
        if rc != 0:
            raise MemoryError(f"mxfp4_linear: no memory for a permuted copy of x {(n, K)}")
    return y


def moe_experts(
    x: torch.Tensor,  # [T, D] float32
    expert_ids: torch.Tensor,  # [T, A] int64
    gates: torch.Tensor,  # [T, A] float32 routing weights
    w: "ExpertWeights",
    limit: float,
    alpha: float,
    *,
    variant: str | None = None,
    threads: int | None = None,
    quantize_x: bool = False,
) -> torch.Tensor:  # [T, D] float32
    """sum_a gate[t, a] * mlp2(swiglu(mlp1(x[t]))) over each token's experts, in one call (moe.c):
    the math and summation order of moerun.ops.moe's per-expert loop. quantize_x: every expert
    uses mxfp4_linear's quantize_x path. Each row is summed alone, in one order whatever the
    row count, and a token's experts are added in expert order, so a token's result never
    depends on the other tokens (nor on how many of them share its experts)."""
    dll, simd, nthreads = _setup(variant, threads)
    T, D = x.shape
    E, two_i = w.mlp1_bias.shape
    _check(x, "x", torch.float32)
    _check(expert_ids, "expert_ids", torch.int64)
    _check(gates, "gates", torch.float32)
    assert expert_ids.shape == gates.shape and expert_ids.shape[0] == T, "ids/gates do not match x"
    assert w.mlp1_blocks.shape == (E, two_i, D // 32, 16), f"mlp1 {tuple(w.mlp1_blocks.shape)}"
    assert w.mlp2_blocks.shape == (E, D, two_i // 64, 16), f"mlp2 {tuple(w.mlp2_blocks.shape)}"
    stacks = []
    for blocks, scales, bias in ((w.mlp1_blocks, w.mlp1_scales, w.mlp1_bias),
                                 (w.mlp2_blocks, w.mlp2_scales, w.mlp2_bias)):  # fmt: skip
        _check(blocks, "blocks", torch.uint8)
        _check(scales, "scales", torch.uint8)
        _check(bias, "bias", bias.dtype)
        stacks += [blocks.data_ptr(), scales.data_ptr(), bias.data_ptr(), _BIAS_KINDS[bias.dtype]]
    out = torch.empty(T, D, dtype=torch.float32)
    sizes = (T, expert_ids.shape[1], E, D, two_i // 2)
    rc = dll.moerun_moe(x.data_ptr(), expert_ids.data_ptr(), gates.data_ptr(), *sizes, *stacks,
                        limit, alpha, out.data_ptr(), nthreads, simd,
                        int(_quantize(quantize_x, simd)))  # fmt: skip
    if rc == -2:
        raise ValueError(f"expert ids must lie in [0, {E})")
    if rc != 0:
        raise MemoryError(f"moe_experts: no memory for the scratch buffers of {T} tokens")
    return out


def paged_attention(
    q: torch.Tensor,  # [N, H, d] float32, RoPE applied
    k_cache: torch.Tensor,  # [num_blocks, bs, K, d] float32 or bfloat16
    v_cache: torch.Tensor,  # [num_blocks, bs, K, d] like k_cache
    block_table: torch.Tensor,  # [B, max_blocks] int32: logical -> physical block, -1 = none
    seq_of_row: torch.Tensor,  # [N] int32: sequence of each query row
    positions: torch.Tensor,  # [N] int32: absolute position of each query row
    sinks: torch.Tensor,  # [H] float32: one logit per head, in the softmax denominator
    sm_scale: float,
    window: int,  # 0 = full causal; else keys p - window + 1 .. p
    *,
    variant: str | None = None,
    threads: int | None = None,
) -> torch.Tensor:  # [N, H, d] float32
    """Sink attention (moerun.ops.attention.sink_attention's math, fp32) of each query row over
    its own sequence's cached keys, read in place through the block table (attention.c); head h
    uses kv head h // G. Every key a row sees must already be in the cache, in a held block.
    A row's result depends only on its own query, position and keys: batch invariant."""
    dll, simd, nthreads = _setup(variant, threads)
    N, H, d = q.shape
    blocks, bs, K, dk = k_cache.shape
    B, max_blocks = block_table.shape
    _check(q, "q", torch.float32)
    assert k_cache.dtype in (torch.float32, torch.bfloat16), f"cache dtype {k_cache.dtype}"
    _check(k_cache, "k_cache", k_cache.dtype)
    _check(v_cache, "v_cache", k_cache.dtype)
    assert v_cache.shape == k_cache.shape and dk == d and H % K == 0, "q, k, v shapes differ"
    indices = {"block_table": (block_table, (B, max_blocks)), "seq_of_row": (seq_of_row, (N,)),
               "positions": (positions, (N,))}  # fmt: skip
    for name, (t, shape) in indices.items():
        _check(t, name, torch.int32)
        assert t.shape == shape, f"{name} {tuple(t.shape)}, expected {shape}"
    _check(sinks, "sinks", torch.float32)
    assert sinks.shape == (H,) and window >= 0, f"sinks {tuple(sinks.shape)}, window {window}"
    # indices the C code trusts: rows name held sequences and positions inside the table
    if N:
        assert int(seq_of_row.min()) >= 0 and int(seq_of_row.max()) < B, "seq_of_row out of range"
        assert int(positions.min()) >= 0 and int(positions.max()) < max_blocks * bs, "positions"
    assert block_table.numel() == 0 or int(block_table.max()) < blocks, "block_table out of range"
    out = torch.empty(N, H, d, dtype=torch.float32)
    if N:
        rc = dll.moerun_paged_attention(
            q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(),
            int(k_cache.dtype == torch.bfloat16), block_table.data_ptr(), max_blocks,
            seq_of_row.data_ptr(), positions.data_ptr(), sinks.data_ptr(), sm_scale, window,
            out.data_ptr(), N, H, K, d, bs, nthreads, simd,
        )  # fmt: skip
        if rc == -2:
            raise ValueError("paged_attention: a visible key lies in a block marked -1")
        if rc != 0:
            raise MemoryError("paged_attention: no memory for the per-thread buffers")
    return out
