"""Each CUDA-path kernel alone at a model's shapes, against its own roofline, in one run.

    python bench/gpu_kernels.py [--preset gpt-oss-120b] [--reps 20] [--json OUT]

One layer's packed experts and a KV cache are drawn in device memory. Rows: the MoE (route +
align + both grouped GEMMs + sum) at decode batches 1/8/64 and at a 1k-token prefill, decode
attention over 2k-token contexts (a full and a sliding layer), prefill attention over 1k
queries. Each row gives the median time, the rate (GB/s of bytes that must be read, or TFLOP/s)
and its fraction of the device's measured copy bandwidth (memory-bound rows; the bf16 peak for
compute rows is left to the reader). Meant for the first GPU session: where a step's time goes
and which kernel is furthest from its limit. On a CPU it runs in Triton's interpreter (slow;
use --small).
"""

import argparse
import json
import statistics
import sys
import time
from functools import partial
from pathlib import Path

import torch

from moerun.bench import _expert_bytes, read_bandwidth_gbs
from moerun.model.config import PRESETS, ModelConfig
from moerun.ops.gpu.attention import paged_decode_attention, paged_prefill_attention
from moerun.ops.gpu.moe import triton_moe
from moerun.ops.gpu.moe_align import triton_route
from moerun.ops.moe import ExpertWeights


def _time(fn, reps: int, device: str) -> float:
    """Median seconds of fn() after one warm-up call (which also compiles)."""
    fn()
    times = []
    for _ in range(reps):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def _experts(cfg: ModelConfig, device: str) -> ExpertWeights:
    E, D, I = cfg.num_experts, cfg.hidden_size, cfg.intermediate_size
    u8 = dict(dtype=torch.uint8, device=device)
    blocks = lambda rows, cols: torch.randint(0, 256, (E, rows, cols // 32, 16), **u8)  # noqa: E731
    scales = lambda rows, cols: torch.randint(119, 122, (E, rows, cols // 32), **u8)  # noqa: E731
    bias = lambda n: torch.randn(E, n, dtype=torch.bfloat16, device=device) * 0.1  # noqa: E731
    return ExpertWeights(blocks(2 * I, D), scales(2 * I, D), bias(2 * I),
                         blocks(D, I), scales(D, I), bias(D))  # fmt: skip


def moe_rows(
    cfg: ModelConfig, device: str, reps: int, dtype: torch.dtype, tokens: tuple[int, ...]
) -> list[dict]:
    w = _experts(cfg, device)
    gate = torch.randn(cfg.num_experts, cfg.hidden_size, dtype=dtype, device=device) * 0.05
    E, A, D, I = cfg.num_experts, cfg.experts_per_token, cfg.hidden_size, cfg.intermediate_size
    rows = []
    for T in tokens:
        x = torch.randn(T, D, dtype=dtype, device=device)

        def step(x=x):
            ids, weights = triton_route(x @ gate.T, A)
            return triton_moe(x, ids, weights, w, cfg.swiglu_limit)

        seconds = _time(step, reps, device)
        touched = E * (1 - (1 - A / E) ** T)  # experts some token picked: read once each
        flops = 2 * T * A * (2 * I * D + D * I)
        rows.append({"kernel": "moe", "shape": f"T={T}", "seconds": seconds,
                     "bytes": touched * _expert_bytes(cfg), "flops": flops})  # fmt: skip
    return rows


def attention_rows(cfg: ModelConfig, device: str, reps: int, dtype: torch.dtype,
                   context: int, prompt: int, batches: tuple[int, ...]) -> list[dict]:  # fmt: skip
    K, H, d, bs = cfg.num_key_value_heads, cfg.num_attention_heads, cfg.head_dim, 16
    i32 = dict(dtype=torch.int32, device=device)
    sinks = torch.randn(H, dtype=dtype, device=device)
    rows = []
    for B in batches:
        blocks = B * context // bs
        k_cache = torch.randn(blocks, bs, K, d, dtype=dtype, device=device)
        v_cache = torch.randn_like(k_cache)
        table = torch.randperm(blocks, device=device).to(torch.int32).view(B, context // bs)
        lens = torch.full((B,), context, **i32)
        q = torch.randn(B, H, d, dtype=dtype, device=device)
        for window in (0, cfg.sliding_window):
            call = partial(paged_decode_attention, q, k_cache, v_cache, table, lens, sinks,
                           d**-0.5, window)  # fmt: skip
            seconds = _time(call, reps, device)
            keys = min(context, window or context)
            rows.append({"kernel": "decode attention", "shape": f"B={B} ctx={context} w={window}",
                         "seconds": seconds, "bytes": 2 * B * keys * K * d * dtype.itemsize,
                         "flops": 4 * B * H * keys * d})  # fmt: skip
    k_cache = torch.randn(prompt // bs, bs, K, d, dtype=dtype, device=device)
    table = torch.arange(prompt // bs, **i32).view(1, -1)
    q = torch.randn(prompt, H, d, dtype=dtype, device=device)
    cu, start = torch.tensor([0, prompt], **i32), torch.zeros(1, **i32)
    for window in (0, cfg.sliding_window):
        call = partial(paged_prefill_attention, q, k_cache, k_cache, table, cu, start, sinks,
                       d**-0.5, window, prompt)  # fmt: skip
        seconds = _time(call, reps, device)
        pairs = sum(min(p + 1, window or p + 1) for p in range(prompt))  # (query, key) pairs
        rows.append({"kernel": "prefill attention", "shape": f"T={prompt} w={window}",
                     "seconds": seconds, "bytes": 3 * prompt * H * d * dtype.itemsize,
                     "flops": 4 * H * pairs * d})  # fmt: skip
    return rows


def run(cfg: ModelConfig, device: str, reps: int, small: bool = False) -> dict:
    """small: tiny shapes and batches for the interpreter (a smoke test, not a measurement)."""
    dtype = torch.bfloat16 if device == "cuda" else torch.float32  # interpreter: fp32
    bandwidth = read_bandwidth_gbs(2048 if device == "cuda" else 64, device=device)
    tokens, batches, context, prompt = (1, 8, 64, 1024), (1, 64), 2048, 1024
    if small:
        cfg = cfg.replace(num_experts=8, hidden_size=64, intermediate_size=64, sliding_window=16,
                          num_attention_heads=8, num_key_value_heads=2, head_dim=16)  # fmt: skip
        tokens, batches, context, prompt = (1, 8), (1, 2), 64, 32
    rows = moe_rows(cfg, device, reps, dtype, tokens)
    rows += attention_rows(cfg, device, reps, dtype, context, prompt, batches)
    for r in rows:
        r["gb_s"] = r["bytes"] / r["seconds"] / 1e9
        r["tflop_s"] = r["flops"] / r["seconds"] / 1e12
        r["of_bandwidth"] = r["gb_s"] / bandwidth
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu (interpreter)"
    return {"device": name, "bandwidth_gbs": bandwidth, "rows": rows}


def table(report: dict) -> str:
    lines = [
        f"{report['device']}: copy bandwidth {report['bandwidth_gbs']:.0f} GB/s",
        f"{'kernel':<18} {'shape':<22} {'us':>9} {'GB/s':>8} {'of bw':>6} {'TFLOP/s':>8}",
    ]
    for r in report["rows"]:
        lines.append(
            f"{r['kernel']:<18} {r['shape']:<22} {r['seconds'] * 1e6:>9.1f} "
            f"{r['gb_s']:>8.1f} {100 * r['of_bandwidth']:>5.1f}% {r['tflop_s']:>8.2f}"
        )
    return "\n".join(lines)  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default="gpt-oss-120b")
    p.add_argument("--device", default="cuda")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--small", action="store_true", help="tiny shapes (the interpreter)")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    report = run(PRESETS[args.preset], args.device, args.reps, args.small)
    print(table(report))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
