"""Where a batch-1 decode step's time goes (issue 14, part 1).

Every backend op the model calls (moerun.ops.backend.Ops) is wrapped in a wall-clock timer;
linears are told apart by their weight's shape. The engine's step is split into scheduling,
the model runner (tensors in, forward, logits), sampling and bookkeeping. What the ops do not
account for inside the forward is Python and torch glue (embedding, residual adds, casts, the
per-step tensors). Each op's bytes (weights it reads) over its time gives the bandwidth it
reaches, to compare with the machine's read bandwidth measured in the same run.

    python bench/profile_decode.py --model /tmp/full20b [--steps 32] [--dense-weights bf16]
"""

import argparse
import dataclasses
import statistics
import time
from collections import defaultdict

import torch

from moerun import LLM, SamplingParams
from moerun.bench import random_prompts, read_bandwidth_report

TIMES: dict[str, list[float]] = defaultdict(list)
BYTES: dict[str, int] = {}


def _timed(name, fn, bytes_of=None):
    def wrapper(*args, **kw):
        key = name(*args) if callable(name) else name
        start = time.perf_counter()
        out = fn(*args, **kw)
        TIMES[key].append(time.perf_counter() - start)
        if bytes_of is not None:
            BYTES[key] = bytes_of(*args)
        return out

    return wrapper


def _nbytes(*tensors) -> int:
    """Bytes of the tensors, looking inside tuples (an Int8Weight, ExpertWeights)."""
    flat = [u for t in tensors for u in (t if isinstance(t, tuple) else (t,))]
    return sum(t.numel() * t.element_size() for t in flat if isinstance(t, torch.Tensor))


def _linear_name(cfg):
    names = {
        cfg.q_size: "linear q",
        cfg.kv_size: "linear k/v",
        cfg.q_size + 2 * cfg.kv_size: "linear qkv",
        cfg.num_experts: "linear router",
        cfg.vocab_size: "unembedding",
    }
    return lambda x, w, b=None: (
        names.get(w.shape[0], "linear out") if w.shape[1] == cfg.hidden_size else "linear out"
    )


def instrument(model) -> None:
    """Replace the model's Ops by timed wrappers (every module holding `.ops`)."""
    ops, cfg = model.ops, model.cfg
    timed = dataclasses.replace(
        ops,
        linear=_timed(_linear_name(cfg), ops.linear, lambda x, w, b=None: _nbytes(w, b)),
        rms_norm=_timed("rms_norm", ops.rms_norm),
        route=_timed("route (top-k, softmax)", ops.route),
        moe=_timed(
            "moe experts",
            ops.moe,
            lambda x, ids, wts, w, *a, **k: _nbytes(*w) * ids.numel() // w.mlp1_blocks.shape[0],
        ),
        attention=_timed("attention (rope, kv write, paged)", ops.attention),
    )
    for module in model.modules():
        if hasattr(module, "ops"):
            module.ops = timed


def instrument_engine(engine) -> None:
    engine.scheduler.schedule = _timed("engine: schedule", engine.scheduler.schedule)
    engine.runner.run = _timed("engine: model runner", engine.runner.run)
    engine._sample = _timed("engine: sample", engine._sample)
    engine.scheduler.postprocess = _timed("engine: postprocess", engine.scheduler.postprocess)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--dense-weights", default="bf16")
    args = ap.parse_args()
    max_len = max(args.prompt_len + args.steps, 128) + 16
    llm = LLM(args.model, dtype=args.dtype, max_model_len=max_len,
              kv_cache_memory=2**30, max_num_seqs=4,
              dense_weights=args.dense_weights)  # fmt: skip
    engine = llm.engine
    prompt = random_prompts(engine.model_cfg, 1, args.prompt_len, 0)[0]
    warm = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    # page every weight in: 128 tokens pick every expert of every layer
    llm.generate(random_prompts(engine.model_cfg, 1, 128, 5), warm)
    instrument(engine.runner.model)
    instrument_engine(engine)
    TIMES.clear()
    engine.add_request(prompt, SamplingParams(temperature=0, max_tokens=args.steps + 1,
                                              ignore_eos=True))  # fmt: skip
    engine.step()  # the prompt
    TIMES.clear()
    steps = []
    while engine.has_unfinished():
        start = time.perf_counter()
        engine.step()
        steps.append(time.perf_counter() - start)
    bw = read_bandwidth_report()
    report(steps, bw)


def report(steps: list[float], bw: dict) -> None:
    n = len(steps)
    step = statistics.mean(steps)  # the parts below are per-step means too
    print(f"{n} decode steps, batch 1, {torch.get_num_threads()} threads; step mean "
          f"{1e3 * step:.1f} ms ({1 / step:.2f} tok/s), median "
          f"{1e3 * statistics.median(steps):.1f}, min {1e3 * min(steps):.1f}, "
          f"max {1e3 * max(steps):.1f}")  # fmt: skip
    print(f"read bandwidth: {bw['gbs']:.1f} GB/s ({bw['method']})")
    print("\n| part | ms per step | share | calls per step | MB read | GB/s |")
    print("|---|---|---|---|---|---|")
    ops_total = 0.0
    rows = sorted(TIMES.items(), key=lambda kv: -sum(kv[1]))
    for name, times in rows:
        per_step = sum(times) / n
        if not name.startswith("engine"):
            ops_total += per_step
        mb = BYTES.get(name, 0) * len(times) / n / 1e6
        gbs = f"{mb / 1e3 / per_step:.1f}" if mb else ""
        print(f"| {name} | {1e3 * per_step:.2f} | {100 * per_step / step:.1f}% | "
              f"{len(times) / n:.0f} | {mb:.0f} | {gbs} |")  # fmt: skip
    runner = sum(TIMES["engine: model runner"]) / n
    print(
        f"| forward glue (runner - ops: embedding, residuals, casts, step tensors) | "
        f"{1e3 * (runner - ops_total):.2f} | {100 * (runner - ops_total) / step:.1f}% | | | |"
    )
    engine = sum(sum(t) for k, t in TIMES.items() if k.startswith("engine")) / n
    print(f"| outside the engine parts (step loop, deltas) | {1e3 * (step - engine):.2f} | "
          f"{100 * (step - engine) / step:.1f}% | | | |")  # fmt: skip


if __name__ == "__main__":
    main()
