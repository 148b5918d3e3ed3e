"""CPU kernels vs the torch path, timed in one run on gpt-oss-20b shapes.

    python bench/kernels.py [--vocab 201088] [--reps 9] [--threads N]

Rows: MXFP4 expert matmuls (mlp1: N=5760, mlp2: N=2880; K=2880) and the bf16 unembedding
(N=vocab, K=2880), for n = 1 (decode) and n = 32 (a prefill chunk grouped by expert); MXFP4 calls
cycle through 32 experts' weights so that, as in decode, they are read from DRAM. Columns:
the kernel (default variant), then baselines: its portable-C variant; for MXFP4, what moe.py does
now (dequantize the expert to bf16, then bf16 matmul + bias) and the matmul alone on a bf16 copy
dequantized beforehand (a lower bound that holds 4x the weight bytes); for bf16, F.linear on bf16
activations. All alternate call by call so that a busy neighbour slows each alike; times are
medians, ratios are baseline / kernel, GB/s counts the weight bytes the kernel reads, GFLOP/s
2 * n * N * K.
"""

import argparse
import itertools
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from moerun.ops.mxfp4 import dequantize
from moerun.ops import cpu
from moerun.ops.cpu import build

K = 2880  # gpt-oss hidden size = expert intermediate size
EXPERTS = 32  # gpt-oss-20b experts per layer: 282 MB of mlp1 weights, more than the L3 cache


def _medians(fns: dict[str, Callable[[], object]], reps: int) -> dict[str, float]:
    """Median seconds of each fn, called in turns after one warm-up call each."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def _report(name: str, n: int, N: int, nbytes: int, times: dict[str, float]) -> None:
    (kernel, t), *baselines = times.items()
    rates = f"{nbytes / t / 1e9:5.1f} GB/s {2 * n * N * K / t / 1e9:5.1f} GFLOP/s"
    cols = [f"{kernel} {t * 1e3:8.2f} ms {rates}"]
    cols += [f"{b} {tb * 1e3:8.2f} ms {tb / t:6.1f}x" for b, tb in baselines]
    print(f"{name:<7} n={n:<3} " + " | ".join(cols), flush=True)


def bench_mxfp4(name: str, N: int, n: int, reps: int) -> None:
    """Each call takes the next of E experts, so weights come from DRAM as they do in decode."""
    g = torch.Generator().manual_seed(0)
    blocks = torch.randint(0, 256, (EXPERTS, N, K // 32, 16), dtype=torch.uint8, generator=g)
    scales = torch.randint(118, 124, (EXPERTS, N, K // 32), dtype=torch.uint8, generator=g)
    bias = torch.randn(EXPERTS, N, generator=g).bfloat16()
    x = torch.randn(n, K, generator=g)
    xb = x.bfloat16()
    # only for the matmul-alone baseline; one expert at a time bounds dequantize's temporaries
    w_bf16 = torch.stack([dequantize(blocks[e], scales[e], torch.bfloat16) for e in range(EXPERTS)])
    calls = itertools.count()

    def expert() -> int:
        return next(calls) % EXPERTS

    def kernel(variant: str | None = None) -> torch.Tensor:
        e = expert()
        return cpu.mxfp4_linear(x, blocks[e], scales[e], bias[e], variant=variant)

    def moe_now() -> torch.Tensor:
        e = expert()
        w = dequantize(blocks[e], scales[e], torch.bfloat16)  # [N, K]
        return xb @ w.T + bias[e]

    def matmul_only() -> torch.Tensor:
        e = expert()
        return xb @ w_bf16[e].T + bias[e]

    fns = {
        "kernel": kernel,
        "scalar C": lambda: kernel("scalar"),
        "dequant+matmul": moe_now,
        "matmul only": matmul_only,
    }
    _report(name, n, N, blocks[0].numel() + scales[0].numel(), _medians(fns, reps))


def bench_bf16(name: str, N: int, n: int, reps: int) -> None:
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(N, K, generator=g).bfloat16()
    x = torch.randn(n, K, generator=g)
    xb = x.bfloat16()
    fns = {
        "kernel": lambda: cpu.bf16_linear(x, weight),
        "scalar C": lambda: cpu.bf16_linear(x, weight, variant="scalar"),
        "F.linear bf16": lambda: F.linear(xb, weight),
    }
    _report(name, n, N, weight.numel() * 2, _medians(fns, reps))


def compile_seconds() -> float:
    """Time one compile into a temporary cache (the process keeps its loaded library)."""
    old = os.environ.get("XDG_CACHE_HOME")
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["XDG_CACHE_HOME"] = tmp
        try:
            t0 = time.perf_counter()
            build.build_library()
            return time.perf_counter() - t0
        finally:
            if old is None:
                del os.environ["XDG_CACHE_HOME"]
            else:
                os.environ["XDG_CACHE_HOME"] = old


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vocab", type=int, default=201088, help="unembedding rows (N)")
    ap.add_argument("--reps", type=int, default=9)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if not cpu.available():
        raise SystemExit("CPU kernels unavailable (see the warning above)")
    print(
        f"{platform.processor() or platform.machine()}; kernel variant {cpu.variant()}; "
        f"threads {torch.get_num_threads()}; torch {torch.__version__}; "
        f"compile {compile_seconds():.2f} s"
    )
    for n in (1, 32):
        bench_mxfp4("mlp1", 2 * K, n, args.reps)
        bench_mxfp4("mlp2", K, n, args.reps)
        bench_bf16("unembed", args.vocab, n, max(3, args.reps // 3))


if __name__ == "__main__":
    main()
