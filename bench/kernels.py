"""CPU kernels vs the torch path, timed in one run on gpt-oss-20b shapes.

    python bench/kernels.py [--vocab 201088] [--reps 9] [--threads N] [--only moe,attention]

Rows: MXFP4 expert matmuls (mlp1: N=5760, mlp2: N=2880; K=2880) and the bf16 unembedding
(N=vocab, K=2880), for n = 1 (decode) and n = 32 (a prefill chunk grouped by expert); MXFP4 calls
cycle through 32 experts' weights so that, as in decode, they are read from DRAM. Then the bf16
and fp32 attention projections (qkv: N=5120, K=2880; out: N=2880, K=4096), the fp32 router and
unembedding, for n = 1 and 512; the whole MoE layer (cpu.moe_experts, top-4 of 32) for 1 and
512 tokens, fp32 and bf16 (quantize_x) activations; and paged attention (64 query heads, 8 kv
heads, d = 64, blocks of 16), decode rows and a prefill chunk.
Columns: the kernel (default variant), then baselines: its portable-C variant; for MXFP4, what
moe.py does now (dequantize the expert to bf16, then bf16 matmul + bias) and the matmul alone on
a bf16 copy dequantized beforehand (a lower bound that holds 4x the weight bytes); for bf16,
F.linear on bf16 activations; for fp32, F.linear (BLAS); for attention, the torch reference on
keys gathered beforehand. All alternate call by call so that a busy neighbour slows each alike;
times are medians, ratios are baseline / kernel, GB/s counts the weight (or K/V) bytes the
kernel reads, GFLOP/s the multiply-adds times 2.
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

from moerun.ops import cpu
from moerun.ops.attention import sink_attention
from moerun.ops.cpu import build
from moerun.ops.experts import SWIGLU_ALPHA, ExpertWeights
from moerun.ops.mxfp4 import dequantize

K = 2880  # gpt-oss hidden size = expert intermediate size
EXPERTS = 32  # gpt-oss-20b experts per layer: 282 MB of mlp1 weights, more than the L3 cache
TOP_K = 4  # experts per token


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


def _report(name: str, n: int, flops: float, nbytes: int, times: dict[str, float]) -> None:
    (kernel, t), *baselines = times.items()
    rates = f"{nbytes / t / 1e9:5.1f} GB/s {flops / t / 1e9:6.1f} GFLOP/s"
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
    _report(name, n, 2 * n * N * K, blocks[0].numel() + scales[0].numel(), _medians(fns, reps))


def bench_bf16(name: str, N: int, n: int, reps: int, Kin: int = K, scalar: bool = True) -> None:
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(N, Kin, generator=g).bfloat16()
    x = torch.randn(n, Kin, generator=g)
    xb = x.bfloat16()
    fns = {"kernel": lambda: cpu.bf16_linear(x, weight)}
    if scalar:  # the portable C at n = 512 would take minutes
        fns["scalar C"] = lambda: cpu.bf16_linear(x, weight, variant="scalar")
    fns["F.linear bf16"] = lambda: F.linear(xb, weight)
    _report(name, n, 2 * n * N * Kin, weight.numel() * 2, _medians(fns, reps))


def bench_f32(name: str, N: int, n: int, reps: int, Kin: int = K) -> None:
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(N, Kin, generator=g)
    x = torch.randn(n, Kin, generator=g)
    fns = {"kernel": lambda: cpu.f32_linear(x, weight), "F.linear f32": lambda: F.linear(x, weight)}
    _report(name, n, 2 * n * N * Kin, weight.numel() * 4, _medians(fns, reps))


def bench_attention(name: str, seqs: int, rows: int, keys: int, window: int, dtype, reps: int):
    """`seqs` sequences of `keys` cached keys each ask their last `rows` positions."""
    H, KV, d, bs = 64, 8, 64, 16
    g = torch.Generator().manual_seed(1)
    per_seq = -(-keys // bs)
    k_cache = torch.randn(seqs * per_seq, bs, KV, d, generator=g).to(dtype)
    v_cache = torch.randn(seqs * per_seq, bs, KV, d, generator=g).to(dtype)
    table = torch.randperm(seqs * per_seq, generator=g).int().reshape(seqs, per_seq)
    seq = torch.arange(seqs).repeat_interleave(rows).int()
    pos = torch.arange(keys - rows, keys).repeat(seqs).int()
    q = torch.randn(seqs * rows, H, d, generator=g)
    sinks = torch.randn(H, generator=g)
    # the reference on keys already gathered per sequence (its gather is not timed)
    ks = [k_cache[table[b].long()].reshape(-1, KV, d)[:keys].float() for b in range(seqs)]
    vs = [v_cache[table[b].long()].reshape(-1, KV, d)[:keys].float() for b in range(seqs)]
    k_pos, q_pos = torch.arange(keys), torch.arange(keys - rows, keys)

    def torch_ref() -> None:
        for b in range(seqs):
            qb = q[b * rows : (b + 1) * rows].reshape(rows, KV, H // KV, d)
            sink_attention(qb, ks[b], vs[b], sinks, d**-0.5, window, q_pos, k_pos)

    fns = {
        "kernel": lambda: cpu.paged_attention(
            q, k_cache, v_cache, table, seq, pos, sinks, d**-0.5, window
        ),  # fmt: skip
        "scalar C": lambda: cpu.paged_attention(
            q, k_cache, v_cache, table, seq, pos, sinks, d**-0.5, window, variant="scalar"
        ),  # fmt: skip
        "torch": torch_ref,
    }
    visible = sum(min(p + 1, window or p + 1) for p in range(keys - rows, keys)) * seqs
    nbytes = seqs * min(keys, (window or keys) + rows) * KV * d * 2 * k_cache.element_size()
    _report(name, seqs * rows, 4 * visible * H * d, nbytes, _medians(fns, reps))


def _random_layer(g: torch.Generator) -> ExpertWeights:
    """One gpt-oss-20b MoE layer: E experts, mlp1 [E, 2I, D/32, 16], mlp2 [E, D, I/32, 16]."""

    def stack(out: int, inp: int) -> list[torch.Tensor]:
        blocks = torch.randint(
            0, 256, (EXPERTS, out, inp // 32, 16), dtype=torch.uint8, generator=g
        )
        scales = torch.randint(118, 124, (EXPERTS, out, inp // 32), dtype=torch.uint8, generator=g)
        return [blocks, scales, torch.randn(EXPERTS, out, generator=g).bfloat16()]

    return ExpertWeights(*stack(2 * K, K), *stack(K, K))


def bench_moe(T: int, reps: int, layers: list[ExpertWeights]) -> None:
    """The whole MoE layer (cpu.moe_experts) for T tokens, top-4, alternating between layers so
    that decode reads its 4 experts from DRAM; fp32 activations, then bf16 ones (quantize_x)."""
    g = torch.Generator().manual_seed(T)
    x = torch.randn(T, K, generator=g)
    ids = torch.stack([torch.randperm(EXPERTS, generator=g)[:TOP_K] for _ in range(T)])
    gates = torch.softmax(torch.randn(T, TOP_K, generator=g), dim=-1)
    calls = itertools.count()

    def layer(quantize_x: bool) -> torch.Tensor:
        w = layers[next(calls) % len(layers)]
        return cpu.moe_experts(x, ids, gates, w, 7.0, SWIGLU_ALPHA, quantize_x=quantize_x)

    expert_bytes = 3 * K * K * 17 // 32  # mlp1 + mlp2: 3 * D * I weights, 17 bytes per 32
    nbytes = ids.unique().numel() * expert_bytes
    flops = 2 * T * TOP_K * 3 * K * K
    for name, q in (("moe f32", False), ("moe q16", True)):
        _report(name, T, flops, nbytes, _medians({"kernel": lambda q=q: layer(q)}, reps))


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
    ap.add_argument("--only", default="linear,moe,attention", help="sections to run")
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
    few = max(3, args.reps // 3)
    if "linear" in args.only:
        for n in (1, 32):
            bench_mxfp4("mlp1", 2 * K, n, args.reps)
            bench_mxfp4("mlp2", K, n, args.reps)
            bench_bf16("unembed", args.vocab, n, few)
        for n in (1, 512):  # attention's qkv and out projections; the router; fp32 variants
            bench_bf16("qkv", 5120, n, args.reps, scalar=n == 1)
            bench_bf16("out", K, n, args.reps, Kin=4096, scalar=n == 1)
            bench_f32("qkv f32", 5120, n, args.reps)
            bench_f32("out f32", K, n, args.reps, Kin=4096)
            bench_f32("router", EXPERTS, n, args.reps)
        bench_f32("unembed f32", args.vocab, 1, few)
    if "moe" in args.only:
        g = torch.Generator().manual_seed(0)
        layers = [_random_layer(g) for _ in range(2)]  # 800 MB: decode reads experts from DRAM
        for T in (1, 512):
            bench_moe(T, args.reps if T == 1 else few, layers)
    if "attention" in args.only:
        for dtype in (torch.float32, torch.bfloat16):
            bench_attention("attn dec", 16, 1, 2048, 0, dtype, args.reps)
            bench_attention("attn pre", 1, 512, 512, 0, dtype, few)
            bench_attention("attn win", 1, 512, 512, 128, dtype, few)


if __name__ == "__main__":
    main()
