"""CPU kernels that read MXFP4 and bf16 weights in place: y = x @ W.T + bias in fp32.

No weight matrix is ever converted: the C code decodes each 32-element MXFP4 block (or 16 bf16
values) into registers, reuses it for a tile of x rows, and accumulates in fp32. The library is
compiled on first use (build.py); without a working compiler available() is False, one warning
line goes to stderr, and callers keep the torch path. AVX2+FMA code runs when the CPU has it;
MOERUN_CPU_KERNEL=scalar (read when the library loads) or variant="scalar" forces portable C.
The AVX2 path permutes x into a scratch copy per call (n * K floats: activations, not weights).

Dims: n = x rows, N = output features, K = input features, G = K / 32 MXFP4 blocks per row.
"""

import ctypes
import functools
import os
import sys
from typing import NamedTuple

import torch

from moerun.ops.cpu.build import BuildError, build_library

_BIAS_KINDS = {torch.float32: 1, torch.bfloat16: 2}  # 0 = no bias; matches kernels.c
_P, _I64, _INT = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int


class _Lib(NamedTuple):
    dll: ctypes.CDLL
    has_avx2: bool
    default_variant: str  # "avx2" or "scalar"


@functools.cache
def _load() -> _Lib | None:
    """Build (or find in the cache) and load the library once per process; None if impossible."""
    try:
        dll = ctypes.CDLL(str(build_library()))
    except (BuildError, OSError) as e:
        reason = " ".join(str(e).split())  # one line, whatever the loader said
        print(f"moerun: CPU kernels unavailable, using the torch path ({reason})", file=sys.stderr)
        return None
    dll.moerun_cpu_has_avx2.restype = _INT
    dll.moerun_cpu_has_avx2.argtypes = []
    dll.moerun_mxfp4_linear.restype = _INT
    dll.moerun_mxfp4_linear.argtypes = [_P, _P, _P, _P, _INT, _P, _I64, _I64, _I64, _INT, _INT]
    dll.moerun_bf16_linear.restype = _INT
    dll.moerun_bf16_linear.argtypes = [_P, _P, _P, _INT, _P, _I64, _I64, _I64, _INT, _INT]
    has_avx2 = bool(dll.moerun_cpu_has_avx2())
    forced_scalar = os.environ.get("MOERUN_CPU_KERNEL", "").lower() == "scalar"
    return _Lib(dll, has_avx2, "avx2" if has_avx2 and not forced_scalar else "scalar")


def available() -> bool:
    return _load() is not None


def variant() -> str | None:
    """The kernel variant calls use by default ("avx2" or "scalar"); None if unavailable."""
    lib = _load()
    return lib.default_variant if lib else None


def variants() -> tuple[str, ...]:
    """Every variant this CPU can run (for tests and benchmarks); () if unavailable."""
    lib = _load()
    return () if lib is None else ("avx2", "scalar") if lib.has_avx2 else ("scalar",)


def _setup(variant: str | None, threads: int | None) -> tuple[ctypes.CDLL, int, int]:
    """(library, simd flag, thread count) for one call."""
    lib = _load()
    if lib is None:
        raise RuntimeError("moerun CPU kernels are unavailable (see the warning above)")
    variant = variant or lib.default_variant
    if variant not in ("avx2", "scalar") or (variant == "avx2" and not lib.has_avx2):
        raise ValueError(f"kernel variant {variant!r} is not available on this CPU")
    # exactly torch's count: the kernels share torch's OpenMP pool instead of oversubscribing
    nthreads = threads or torch.get_num_threads()
    return lib.dll, int(variant == "avx2"), nthreads


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
) -> torch.Tensor:  # [n, N] float32
    """x @ W.T + bias for one expert's MXFP4 weight W (logical [N, K], spec §3.1), read packed:
    element 2j of a block is the low nibble of byte j, value = E2M1(code) * 2**(scale - 127)."""
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
        if dll.moerun_mxfp4_linear(*args, y.data_ptr(), n, N, K, nthreads, simd) != 0:
            raise MemoryError(f"mxfp4_linear: no memory for a permuted copy of x {(n, K)}")
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
    dll, simd, nthreads = _setup(variant, threads)
    N, K = weight.shape
    n = x.shape[0]
    assert x.dim() == 2 and x.shape[1] == K, f"x {tuple(x.shape)} does not match weight {(N, K)}"
    _check(x, "x", torch.float32)
    _check(weight, "weight", torch.bfloat16)
    bias_ptr, bias_kind = _bias(bias, N)
    y = torch.empty(n, N, dtype=torch.float32)
    if n and N:
        args = (x.data_ptr(), weight.data_ptr(), bias_ptr, bias_kind, y.data_ptr())
        if dll.moerun_bf16_linear(*args, n, N, K, nthreads, simd) != 0:
            raise MemoryError(f"bf16_linear: no memory for a permuted copy of x {(n, K)}")
    return y
