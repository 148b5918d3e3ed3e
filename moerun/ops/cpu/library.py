"""Loading the CPU kernels' library (built on first use, build.py) and what every binding
shares: the variant and thread count of a call, argument checks, bias kinds."""

import ctypes
import functools
import os
import sys
import time
from typing import NamedTuple

import torch

from moerun.ops.cpu.build import BuildError, build_library

_BIAS_KINDS = {torch.float32: 1, torch.bfloat16: 2}  # 0 = no bias; matches kernels.c
_P, _I64, _INT, _F = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float


_SIMD = {"scalar": 0, "avx2": 1, "avx512": 2}  # the drivers' `simd` argument, in kernels.c
XMODE_F32, XMODE_BF16, XMODE_BF16_DOT = 0, 1, 2  # what x holds: bf16_linear's xmode (kernels.h)


class _Lib(NamedTuple):
    dll: ctypes.CDLL
    variants: tuple[str, ...]  # what this CPU runs, best first
    default_variant: str
    has_vnni: bool  # AVX-512 VNNI: the quantized-x MXFP4 kernels (mxfp4_vnni.c, mxfp4_q16.c)
    bf16dot: bool  # the bf16 many-row tiles run on vdpbf16ps: exact here, and faster here


@functools.cache
def _load() -> _Lib | None:
    """Build (or find in the cache) and load the library once per process; None if impossible."""
    try:
        dll = ctypes.CDLL(str(build_library()))
    except (BuildError, OSError) as e:
        reason = " ".join(str(e).split())  # one line, whatever the loader said
        print(f"moerun: CPU kernels unavailable, using the torch path ({reason})", file=sys.stderr)
        return None
    probes = (dll.moerun_cpu_has_avx2, dll.moerun_cpu_has_avx512, dll.moerun_cpu_has_vnni,
              dll.moerun_cpu_has_bf16dot)  # fmt: skip
    for probe in probes:
        probe.restype, probe.argtypes = _INT, []
    dll.moerun_mxfp4_linear.restype = _INT
    dll.moerun_mxfp4_linear.argtypes = [_P, _P, _P, _P, _INT, _P, _I64, _I64, _I64, _INT, _INT]
    for dense in (dll.moerun_bf16_linear, dll.moerun_f32_linear):
        dense.restype = _INT
        dense.argtypes = [_P, _P, _P, _INT, _P, _I64, _I64, _I64, _INT, _INT]
    dll.moerun_bf16_linear.argtypes = [*dll.moerun_f32_linear.argtypes, _INT]  # + xmode
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
    bf16dot = has_avx512 and bool(dll.moerun_cpu_has_bf16dot()) and _bf16dot_faster(dll)
    default = forced if forced in variants else variants[0]
    return _Lib(dll, variants, default, has_vnni, bf16dot)


def _bf16dot_faster(dll: ctypes.CDLL) -> bool:
    """Whether the bf16 tiles run faster on vdpbf16ps than on FMAs on this CPU (the same bits
    either way): measured, since it depends on the core (one vdpbf16ps does 32 products, but
    this project's Intel Xeon issues it at a third of the FMA rate, 0.85x in the tiles). Best
    of 5 on one thread, ~2 ms."""
    n, N, K = 64, 96, 1024
    x = torch.randn(n, K, generator=torch.Generator().manual_seed(0)).bfloat16().float()
    w, y = torch.ones(N, K, dtype=torch.bfloat16), torch.empty(n, N)
    best = {}
    for xmode in (XMODE_BF16, XMODE_BF16_DOT):  # FMAs, vdpbf16ps
        times = []
        for _ in range(5):
            start = time.perf_counter()
            dll.moerun_bf16_linear(x.data_ptr(), w.data_ptr(), None, 0, y.data_ptr(), n, N, K, 1,
                                   _SIMD["avx512"], xmode)  # fmt: skip
            times.append(time.perf_counter() - start)
        best[xmode] = min(times)
    return best[XMODE_BF16_DOT] < 0.9 * best[XMODE_BF16]


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


def has_bf16dot() -> bool:
    """Whether this CPU's vdpbf16ps (AVX512-BF16) rounds exactly as the FMA path (checked at
    load), so bf16_linear(x_bf16=True, dot=True) may use it."""
    lib = _load()
    return bool(lib and lib.dll.moerun_cpu_has_bf16dot())


def uses_bf16dot() -> bool:
    """Whether bf16_linear(x_bf16=True) uses vdpbf16ps by default: exact and measured faster
    here (for reports)."""
    lib = _load()
    return bool(lib and lib.bf16dot)


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
