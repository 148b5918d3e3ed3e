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

import ctypes
import functools
import os
import sys
from typing import TYPE_CHECKING, NamedTuple

import torch

from moerun.ops.cpu.build import BuildError, build_library

if TYPE_CHECKING:
    from moerun.ops.experts import ExpertWeights
    from moerun.ops.int8 import Int8Weight

_BIAS_KINDS = {torch.float32: 1, torch.bfloat16: 2}  # 0 = no bias; matches kernels.c
_P, _I64, _INT, _F = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float


_SIMD = {"scalar": 0, "avx2": 1, "avx512": 2}  # the drivers' `simd` argument, in kernels.c


class _Lib(NamedTuple):
    dll: ctypes.CDLL
    variants: tuple[str, ...]  # what this CPU runs, best first
    default_variant: str
    has_vnni: bool  # AVX-512 VNNI: the quantized-x MXFP4 kernels (mxfp4_vnni.c, mxfp4_q16.c)


@functools.cache
def _load() -> _Lib | None:
    """Build (or find in the cache) and load the library once per process; None if impossible."""
    try:
        dll = ctypes.CDLL(str(build_library()))
    except (BuildError, OSError) as e:
        reason = " ".join(str(e).split())  # one line, whatever the loader said
        print(f"moerun: CPU kernels unavailable, using the torch path ({reason})", file=sys.stderr)
        return None
    for probe in (dll.moerun_cpu_has_avx2, dll.moerun_cpu_has_avx512, dll.moerun_cpu_has_vnni):
        probe.restype, probe.argtypes = _INT, []
    dll.moerun_mxfp4_linear.restype = _INT
    dll.moerun_mxfp4_linear.argtypes = [_P, _P, _P, _P, _INT, _P, _I64, _I64, _I64, _INT, _INT]
    for dense in (dll.moerun_bf16_linear, dll.moerun_f32_linear):
        dense.restype = _INT
        dense.argtypes = [_P, _P, _P, _INT, _P, _I64, _I64, _I64, _INT, _INT]
    dll.moerun_rms_norm.restype = None
    dll.moerun_rms_norm.argtypes = [_P, _INT, _P, _F, _P, _I64, _I64, _INT]
    dll.moerun_int8_linear.restype = _INT
    dll.moerun_int8_linear.argtypes = [_P, _P, _P, _P, _P, _INT, _P, _I64, _I64, _I64, _INT, _INT]
    dll.moerun_mxfp4_linear_q16.restype = _INT
    dll.moerun_mxfp4_linear_q16.argtypes = [_P, _P, _P, _P, _INT, _P, _I64, _I64, _I64, _INT]
    dll.moerun_moe.restype = _INT
    dll.moerun_moe.argtypes = [_P, _P, _P, *[_I64] * 5, *[_P, _P, _P, _INT] * 2, _F, _F, _P,
                               _INT, _INT, _INT]  # fmt: skip
    dll.moerun_paged_attention.restype = _INT
    dll.moerun_paged_attention.argtypes = [_P, _P, _P, _INT, _P, _I64, _P, _P, _P, _F, _I64, _P,
                                           *[_I64] * 5, _INT, _INT]  # fmt: skip
    has_avx2 = bool(dll.moerun_cpu_has_avx2())
    has_avx512 = has_avx2 and bool(dll.moerun_cpu_has_avx512())
    variants = ("avx512",) * has_avx512 + ("avx2",) * has_avx2 + ("scalar",)
    forced = os.environ.get("MOERUN_CPU_KERNEL", "").lower()
    has_vnni = has_avx512 and bool(dll.moerun_cpu_has_vnni())
    return _Lib(dll, variants, forced if forced in variants else variants[0], has_vnni)


def available() -> bool:
    return _load() is not None


def variant() -> str | None:
    """The kernel variant calls use by default ("avx512", "avx2" or "scalar"); None if
    unavailable."""
    lib = _load()
    return lib.default_variant if lib else None


def variants() -> tuple[str, ...]:
    """Every variant this CPU can run (for tests and benchmarks); () if unavailable."""
    lib = _load()
    return () if lib is None else lib.variants


def _setup(variant: str | None, threads: int | None) -> tuple[ctypes.CDLL, int, int]:
    """(library, simd flag, thread count) for one call."""
    lib = _load()
    if lib is None:
        raise RuntimeError("moerun CPU kernels are unavailable (see the warning above)")
    variant = variant or lib.default_variant
    if variant not in lib.variants:
        raise ValueError(f"kernel variant {variant!r} is not available on this CPU")
    # exactly torch's count: the kernels share torch's OpenMP pool instead of oversubscribing
    nthreads = threads or torch.get_num_threads()
    return lib.dll, _SIMD[variant], nthreads


def has_vnni() -> bool:
    """Whether quantize_x can take the integer-dot path (avx512 variant with VNNI)."""
    lib = _load()
    return bool(lib and lib.has_vnni)


def _quantize(quantize_x: bool, simd: int) -> bool:
    """quantize_x is honoured by the avx512 variant on a CPU with VNNI only."""
    lib = _load()
    return bool(quantize_x and lib and lib.has_vnni and simd == _SIMD["avx512"])


def _check(t: torch.Tensor, name: str, dtype: torch.dtype) -> None:
    assert t.dtype == dtype, f"{name} must be {dtype}, got {t.dtype}"
    assert t.device.type == "cpu" and t.is_contiguous(), f"{name} must be a contiguous CPU tensor"


def _bias(bias: torch.Tensor | None, N: int) -> tuple[int | None, int]:
    if bias is None:
        return None, 0
    assert bias.shape == (N,), f"bias {tuple(bias.shape)} does not match N={N}"
    assert bias.dtype in _BIAS_KINDS, f"bias must be float32 or bfloat16, got {bias.dtype}"
    _check(bias, "bias", bias.dtype)
    return bias.data_ptr(), _BIAS_KINDS[bias.dtype]


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


def _dense_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, variant: str | None,
    threads: int | None,
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
        fn = dll.moerun_bf16_linear if weight.dtype == torch.bfloat16 else dll.moerun_f32_linear
        args = (x.data_ptr(), weight.data_ptr(), bias_ptr, bias_kind, y.data_ptr())
        if fn(*args, n, N, K, nthreads, simd) != 0:
            raise MemoryError(f"linear: no memory for a permuted copy of x {(n, K)}")
    return y


def bf16_linear(
    x: torch.Tensor,  # [n, K] float32
    weight: torch.Tensor,  # [N, K] bfloat16
    bias: torch.Tensor | None = None,  # [N] bf16 or fp32
    *,
    variant: str | None = None,
    threads: int | None = None,
) -> torch.Tensor:  # [n, N] float32
    """x @ weight.T + bias with the bf16 weight read as is (never converted to an fp32 copy)."""
    assert weight.dtype == torch.bfloat16, f"weight must be torch.bfloat16, got {weight.dtype}"
    return _dense_linear(x, weight, bias, variant, threads)


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
