"""Dense bindings: bf16 / fp32 / int8 weights (y = x @ W.T + bias in fp32) and RMSNorm."""

from typing import TYPE_CHECKING

import torch

from moerun.ops.cpu.library import (
    XMODE_BF16,
    XMODE_BF16_DOT,
    XMODE_F32,
    _bias,
    _check,
    _quantize,
    _setup,
    uses_bf16dot,
)

if TYPE_CHECKING:
    from moerun.ops.int8 import Int8Weight


def _dense_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, variant: str | None,
    threads: int | None, xmode: int = XMODE_F32,
) -> torch.Tensor:  # fmt: skip
    dll, simd, nthreads = _setup(variant, threads)
    N, K = weight.shape
    n = x.shape[0]
    assert x.dim() == 2 and x.shape[1] == K, f"x {tuple(x.shape)} does not match weight {(N, K)}"
    _check(x, "x", torch.float32)
    _check(weight, "weight", weight.dtype)
    bias_ptr, bias_kind = _bias(bias, N)
    y = torch.empty(n, N, dtype=torch.float32)
    if n and N:
        args = (x.data_ptr(), weight.data_ptr(), bias_ptr, bias_kind, y.data_ptr(), n, N, K,
                nthreads, simd)  # fmt: skip
        if weight.dtype == torch.bfloat16:
            rc = dll.moerun_bf16_linear(*args, xmode)
        else:
            rc = dll.moerun_f32_linear(*args)
        if rc != 0:
            raise MemoryError(f"linear: no memory for a permuted copy of x {(n, K)}")
    return y


def bf16_linear(
    x: torch.Tensor,  # [n, K] float32
    weight: torch.Tensor,  # [N, K] bfloat16
    bias: torch.Tensor | None = None,  # [N] bf16 or fp32
    *,
    variant: str | None = None,
    threads: int | None = None,
    x_bf16: bool = False,
    dot: bool | None = None,
) -> torch.Tensor:  # [n, N] float32
    """x @ weight.T + bias with the bf16 weight read as is (never converted to an fp32 copy).

    x_bf16: x holds bf16 values (bf16 activations; the caller guarantees it). The avx512
    variant then computes with denormals flushed to zero, and its many-row path (n > 4) may
    use AVX512-BF16's vdpbf16ps (32 products an instruction) instead of FMAs, for the same
    bits (ops/cpu/avx512_tiles.c): where this CPU's vdpbf16ps is exact and was measured
    faster at load (dot=None), or wherever it is exact (dot=True), or never (dot=False)."""
    assert weight.dtype == torch.bfloat16, f"weight must be torch.bfloat16, got {weight.dtype}"
    dot = uses_bf16dot() if dot is None else dot
    xmode = (XMODE_BF16_DOT if dot else XMODE_BF16) if x_bf16 else XMODE_F32
    return _dense_linear(x, weight, bias, variant, threads, xmode)


def f32_linear(
    x: torch.Tensor,  # [n, K] float32
    weight: torch.Tensor,  # [N, K] float32
    bias: torch.Tensor | None = None,  # [N] bf16 or fp32
    *,
    variant: str | None = None,
    threads: int | None = None,
) -> torch.Tensor:  # [n, N] float32
    """x @ weight.T + bias for an fp32 weight: F.linear's result to fp32 rounding, but each row
    summed in an order independent of n (BLAS picks its blocking by shape)."""
    assert weight.dtype == torch.float32, f"weight must be torch.float32, got {weight.dtype}"
    return _dense_linear(x, weight, bias, variant, threads)


def rms_norm(
    x: torch.Tensor,  # [n, D] float32 or bfloat16
    scale: torch.Tensor,  # [D] float32
    eps: float,
    *,
    threads: int | None = None,
) -> torch.Tensor:  # [n, D], x's dtype
    """moerun.ops.dense.rms_norm in one C call (norm.c): fp32 statistics and scale, one
    rounding to x's dtype; each row's sum in a fixed order (batch invariant)."""
    dll, _, nthreads = _setup(None, threads)
    assert x.dim() == 2 and x.dtype in (torch.float32, torch.bfloat16), f"x {x.dtype} {x.shape}"
    _check(x, "x", x.dtype)
    _check(scale, "scale", torch.float32)
    n, D = x.shape
    assert scale.shape == (D,), f"scale {tuple(scale.shape)} does not match D={D}"
    y = torch.empty_like(x)
    if n and D:
        bf16 = int(x.dtype == torch.bfloat16)
        dll.moerun_rms_norm(x.data_ptr(), bf16, scale.data_ptr(), eps, y.data_ptr(), n, D,
                            nthreads)  # fmt: skip
    return y


def int8_linear(
    x: torch.Tensor,  # [n, K] float32
    w: "Int8Weight",  # q [N, K] int8, scale [N] fp32, row_sum [N] int32
    bias: torch.Tensor | None = None,  # [N] bf16 or fp32
    *,
    variant: str | None = None,
    threads: int | None = None,
) -> torch.Tensor:  # [n, N] float32
    """moerun.ops.int8.int8_linear's exact arithmetic (the same bits) in C (int8.c): integer
    dot products, AVX-512 VNNI on the avx512 variant of a CPU that has it."""
    dll, simd, nthreads = _setup(variant, threads)
    N, K = w.q.shape
    n = x.shape[0]
    assert x.dim() == 2 and x.shape[1] == K, f"x {tuple(x.shape)} does not match weight {(N, K)}"
    assert K < 66_000, "int8_linear: K must stay below 66,000 (int32 sums)"
    _check(x, "x", torch.float32)
    _check(w.q, "q", torch.int8)
    _check(w.scale, "scale", torch.float32)
    _check(w.row_sum, "row_sum", torch.int32)
    assert w.scale.shape == (N,) and w.row_sum.shape == (N,), "scale / row_sum do not match q"
    bias_ptr, bias_kind = _bias(bias, N)
    y = torch.empty(n, N, dtype=torch.float32)
    if n and N:
        vnni = int(_quantize(True, simd))
        args = (x.data_ptr(), w.q.data_ptr(), w.scale.data_ptr(), w.row_sum.data_ptr())
        if dll.moerun_int8_linear(*args, bias_ptr, bias_kind, y.data_ptr(), n, N, K, nthreads,
                                  vnni) != 0:  # fmt: skip
            raise MemoryError(f"int8_linear: no memory for the quantized copy of x {(n, K)}")
    return y
