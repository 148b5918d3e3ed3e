"""GPU benchmark on a random gpt-oss-120b-shaped model built directly in GPU memory.

    python bench/gpu_bench.py [--preset gpt-oss-120b] [--budget-s 360] [--profile] [--json OUT]

No checkpoint is read: the weights are drawn in place on the device (experts packed MXFP4), so
the run measures the engine, not the disk. One table: time to first token for a 1k prompt,
batch-1 decode tokens/s (CUDA graphs, and eager in the same run as the baseline), output
tokens/s with 64 concurrent 1k-in/1k-out requests, GPU memory, and batch-1 decode against the
memory-bandwidth limits (bytes a decode step reads / the copy bandwidth measured here; at 64
concurrent most experts are read every step, see moerun.bench.decode_bytes_per_step).
Each phase stops at its share of --budget-s and reports the rate so far, so the whole run fits
one 8-minute device session.
"""

import argparse
import json
import statistics
import sys
import time
import traceback
from dataclasses import replace
from pathlib import Path

import torch

from moerun.bench import (
    decode_bytes_per_step,
    decode_bytes_per_token,
    random_prompts,
    read_bandwidth_gbs,
)
from moerun.config import EngineConfig
from moerun.engine.llm_engine import LLMEngine
from moerun.model.config import FULL, PRESETS, ModelConfig
from moerun.model.synth import random_model
from moerun.sampling import SamplingParams


def _log(msg: str) -> None:
    print(f"[gpu_bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _engine(model, cfg: ModelConfig, args, seqs: int, eager: bool) -> LLMEngine:
    max_len = args.prompt_len + args.gen_len + 16
    full_layers = sum(t == FULL for t in cfg.layer_types)
    per_token = 2 * cfg.num_key_value_heads * cfg.head_dim * 2 * full_layers  # K and V, bf16
    # every request at full length in the full layers; sliding layers hold ~(window + a chunk)
    # per request: 64 x 1k/1k on 120b needs 4.9 GB + 0.5 GB
    kv = seqs * (max_len + 16) * per_token + 2**30
    ecfg = EngineConfig(f"synthetic:{args.preset}", args.device, "bfloat16", max_len, kv,
                        max_num_seqs=seqs, max_num_batched_tokens=max(2048, args.prompt_len),
                        kernels=args.kernels, enforce_eager=eager)  # fmt: skip
    return LLMEngine(ecfg, model=model)


def _run(engine: LLMEngine, prompts, params: SamplingParams, budget_s: float) -> dict:
    """Until all finish or the budget is spent: first-token times and output token rates."""
    start = time.perf_counter()
    ids = [engine.add_request(p, params) for p in prompts]
    first: dict[str, float] = {}
    counts = dict.fromkeys(ids, 0)
    while engine.has_unfinished() and time.perf_counter() - start < budget_s:
        for delta in engine.step():
            counts[delta.request_id] += len(delta.token_ids)
            if delta.token_ids and delta.request_id not in first:
                first[delta.request_id] = time.perf_counter()
    end = time.perf_counter()
    cut = engine.has_unfinished()
    for r in ids:
        engine.abort(r)
    after_first = sum(counts.values()) - len(first)  # tokens decoded after each first token
    t_first = max(first.values(), default=end)
    return {
        "ttft_s": min(first.values(), default=end) - start,
        "out_tok_s": sum(counts.values()) / (end - start),
        "decode_tok_s": after_first / (end - min(first.values(), default=end)),
        "decode_tok_s_all_started": (sum(counts.values()) - len(ids)) / (end - t_first)
        if len(first) == len(ids) and end > t_first else float("nan"),
        "tokens": sum(counts.values()), "seconds": end - start, "cut": cut,
    }  # fmt: skip


def _phase(report: dict, name: str, fn) -> None:
    """report[name] = fn(); a failure is recorded, not raised: one device run, most answers."""
    _log(name)
    try:
        report[name] = fn()
    except Exception as e:  # noqa: BLE001 - reported in the table and the JSON
        traceback.print_exc()
        report[name] = {"error": f"{type(e).__name__}: {e}"[:300]}


def bench(cfg: ModelConfig, args) -> dict:
    budget = args.budget_s
    t0 = time.perf_counter()
    _log(f"building a random {args.preset} on {args.device}")
    model = random_model(cfg, torch.bfloat16, args.kernels, args.device, seed=0)
    _sync(args.device)
    report: dict = {"preset": args.preset, "device": _device_name(args.device),
                    "build_s": time.perf_counter() - t0,
                    "concurrency": args.concurrency}  # fmt: skip
    _phase(report, "engine", lambda: _engine(model, cfg, args, args.concurrency, eager=False))
    engine = report.pop("engine")
    if isinstance(engine, dict):  # graph capture failed: measure the rest eagerly
        report["graphs_error"] = engine["error"]
        engine = _engine(model, cfg, args, args.concurrency, eager=True)
    greedy = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    prompts = random_prompts(cfg, args.concurrency + 4, args.prompt_len, seed=1)
    _phase(report, "warmup", lambda: _run(engine, prompts[:2], replace(greedy, max_tokens=4),
                                          budget))  # fmt: skip
    report["startup_s"] = time.perf_counter() - t0
    _phase(report, "ttft", lambda: {"ttft_s": statistics.median(
        _run(engine, [prompts[i]], greedy, budget)["ttft_s"] for i in range(3))})  # fmt: skip
    decode = replace(greedy, max_tokens=args.decode_tokens)
    _phase(report, "decode_b1_graphs", lambda: _run(engine, [prompts[3]], decode, 0.12 * budget))
    eager = _engine(model, cfg, args, 1, eager=True)
    _phase(report, "decode_b1_eager", lambda: _run(eager, [prompts[3]], decode, 0.12 * budget))
    many = SamplingParams(temperature=0, max_tokens=args.gen_len, ignore_eos=True)
    _phase(report, "concurrent", lambda: _run(engine, prompts[4:], many, 0.5 * budget))
    report.update(_memory(args.device))
    mib = 2048 if args.device == "cuda" else 256  # far past the caches, either way
    report["bandwidth_gbs"] = read_bandwidth_gbs(mib, device=args.device)
    report["decode_bytes_per_token"] = decode_bytes_per_token(cfg)
    # 64 concurrent: most experts are read every step; the mean context is prompt + gen / 2
    step = decode_bytes_per_step(cfg, args.concurrency, args.prompt_len + args.gen_len // 2)
    report["concurrent_limit_tok_s"] = args.concurrency * report["bandwidth_gbs"] * 1e9 / step
    report["bandwidth_limit_tok_s"] = (
        report["bandwidth_gbs"] * 1e9 / report["decode_bytes_per_token"]
    )
    if args.profile:
        _phase(report, "profile", lambda: profile_steps(eager, prompts[3], args.device))
    report["total_s"] = time.perf_counter() - t0
    return report


def profile_steps(engine: LLMEngine, prompt: list[int], device: str, top: int = 20) -> dict:
    """Kernel times of one prefill and 8 eager batch-1 decode steps: where a step's time goes."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    params = SamplingParams(temperature=0, max_tokens=9, ignore_eos=True)
    with profile(activities=acts) as prof:
        _run(engine, [prompt], params, 60)
    key = "self_device_time_total" if device == "cuda" else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=key, row_limit=top)
    print(table, file=sys.stderr)
    return {"table": table}


def _device_name(device: str) -> str:
    return torch.cuda.get_device_name() if device == "cuda" else "cpu"


def _memory(device: str) -> dict:
    if device != "cuda":
        return {}
    free, total = torch.cuda.mem_get_info()
    return {"gpu_used_gib": (total - free) / 2**30, "gpu_total_gib": total / 2**30,
            "torch_peak_gib": torch.cuda.max_memory_allocated() / 2**30}  # fmt: skip


def _rate(x: dict, key: str, fmt: str = ".1f") -> str:
    if "error" in x:
        return f"failed: {x['error']}"
    return f"{x[key]:{fmt}} tok/s" + (" (cut at budget)" if x["cut"] else "")


def table(r: dict) -> str:
    b1, eager, many = r["decode_b1_graphs"], r["decode_b1_eager"], r["concurrent"]
    ok = "error" not in b1 and "error" not in eager
    speedup = f" -> graphs {b1['decode_tok_s'] / eager['decode_tok_s']:.2f}x" if ok else ""
    ttft = r["ttft"]
    rows = [
        ("model / device", f"random {r['preset']} on {r['device']}"),
        ("build in device memory / startup", f"{r['build_s']:.1f} s / {r['startup_s']:.1f} s"),
        ("TTFT, 1k prompt (median of 3)",
         ttft.get("error") or f"{1000 * ttft['ttft_s']:.1f} ms"),
        ("batch-1 decode, CUDA graphs", r.get("graphs_error") or _rate(b1, "decode_tok_s")),
        ("batch-1 decode, eager (baseline)", _rate(eager, "decode_tok_s") + speedup),
        (f"{r['concurrency']} concurrent 1k/1k, output", _rate(many, "out_tok_s", ".0f")),
    ]  # fmt: skip
    rows.append(("  bandwidth limit at that batch (all reads once)",
                 f"{r['concurrent_limit_tok_s']:.0f} tok/s"))  # fmt: skip
    if "error" not in many:
        rows.append(("  tokens, seconds / decode once all started",
                     f"{many['tokens']} in {many['seconds']:.1f} s / "
                     f"{many['decode_tok_s_all_started']:.0f} tok/s"))  # fmt: skip
    limit = r["bandwidth_limit_tok_s"]
    rows.append(
        (
            "copy bandwidth / decode bytes per token",
            f"{r['bandwidth_gbs']:.0f} GB/s / {r['decode_bytes_per_token'] / 1e9:.2f} GB",
        )
    )
    if "error" not in b1:
        rows.append(("batch-1 decode / bandwidth limit",
                     f"{b1['decode_tok_s']:.1f} / {limit:.0f} tok/s"
                     f" = {100 * b1['decode_tok_s'] / limit:.1f}%"))  # fmt: skip
    if "gpu_used_gib" in r:
        rows.append(("GPU memory used / total (torch peak)",
                     f"{r['gpu_used_gib']:.1f} / {r['gpu_total_gib']:.1f} GiB "
                     f"({r['torch_peak_gib']:.1f})"))  # fmt: skip
    rows.append(("whole run", f"{r['total_s']:.0f} s"))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default="gpt-oss-120b")
    p.add_argument("--layers", type=int, help="override num_hidden_layers (quick runs)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--kernels", default="auto")
    p.add_argument("--prompt-len", type=int, default=1024)
    p.add_argument("--gen-len", type=int, default=1024)
    p.add_argument("--decode-tokens", type=int, default=256)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--budget-s", type=float, default=360, help="time for the timed phases")
    p.add_argument("--profile", action="store_true", help="kernel times of a few steps")
    p.add_argument("--json", type=Path, help="also write the report here")
    args = p.parse_args(argv)
    cfg = PRESETS[args.preset]
    if args.layers:
        cfg = cfg.replace(num_hidden_layers=args.layers)
    report = bench(cfg, args)
    print(table(report))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
