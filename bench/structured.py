"""Structured outputs: what a JSON schema costs (issue 15).

1. Compile: every schema of tests/data/structured_schemas.json through llguidance (the turn
   grammar the server builds): how many compile, and the time (median / max), cold and cached.
2. Mask: the time per token of GrammarConstraint.mask (median / p99) while the model samples.
3. Decode tok/s with a schema vs without, batch 1 and 16, same run, same prompts; every request
   runs exactly --gen-len tokens (ignore_eos), so both sides decode the same number of steps.

    python bench/structured.py --model /tmp/full20b [--gen-len 32] [--batch 1,16] [--json]
"""

import argparse
import functools
import json
import statistics
import time
from pathlib import Path

import torch

from moerun import LLM, SamplingParams
from moerun.harmony import structured
from moerun.harmony.render import RenderOptions, render_prompt
from moerun.harmony.structured import GrammarConstraint, check_grammar, turn_grammar

SCHEMAS = Path(__file__).parent.parent / "tests" / "data" / "structured_schemas.json"
# free strings in an array: a random model stays inside the JSON for the whole run
LONG = {"type": "object", "properties": {"notes": {"type": "array", "items": {"type": "string"}}},
        "required": ["notes"]}  # fmt: skip


def compile_times() -> dict:
    schemas = {n: e["schema"] for n, e in json.loads(SCHEMAS.read_text()).items()}
    structured.ll_tokenizer()
    cold, cached, failed = [], [], []
    for name, schema in schemas.items():
        lark = turn_grammar(schema, max_reasoning=8)
        t0 = time.perf_counter()
        try:
            check_grammar(lark)
        except ValueError as e:
            failed.append(f"{name}: {e}")
            continue
        t1 = time.perf_counter()
        GrammarConstraint(lark)  # a request's copy of the cached matcher
        cold.append(t1 - t0)
        cached.append(time.perf_counter() - t1)
    ms = lambda xs: [round(x * 1e3, 3) for x in (statistics.median(xs), max(xs))]  # noqa: E731
    return {"schemas": len(schemas), "compiled": len(cold), "failed": failed,
            "compile_ms_median_max": ms(cold), "per_request_ms_median_max": ms(cached)}  # fmt: skip


def time_masks() -> list[float]:
    """Wraps GrammarConstraint.mask to time every call; returns the list it fills."""
    times: list[float] = []
    inner = GrammarConstraint.mask

    def timed(constraint: GrammarConstraint, logits: torch.Tensor) -> None:
        t0 = time.perf_counter()
        inner(constraint, logits)
        times.append(time.perf_counter() - t0)

    GrammarConstraint.mask = timed
    return times


def decode_rate(llm: LLM, prompt: list[int], batch: int, gen_len: int, lark: str | None) -> float:
    """Decode tok/s of `batch` requests, from the step after every prefill is done."""
    constraint = None if lark is None else functools.partial(GrammarConstraint, lark)
    params = [SamplingParams(max_tokens=gen_len, seed=i, ignore_eos=True, constraint=constraint)
              for i in range(batch)]  # fmt: skip
    for i, p in enumerate(params):
        llm.engine.add_request(prompt, p, f"b{i}")
    started: set[str] = set()
    first, tokens, done = None, 0, 0
    while done < batch:
        for delta in llm.engine.step():
            done += delta.finished
            if first is not None:
                tokens += len(delta.token_ids)
            elif delta.token_ids:
                started.add(delta.request_id)
        if first is None and len(started) == batch:
            first = time.perf_counter()  # every request is past its prefill
    return tokens / (time.perf_counter() - first)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--gen-len", type=int, default=32)
    ap.add_argument("--batch", default="1,16")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    report = {"threads": torch.get_num_threads(), "compile": compile_times()}
    llm = LLM(args.model, max_model_len=2048)
    msgs = [{"role": "user", "content": "List what you know about the weather."}]
    prompt = render_prompt(msgs, [], RenderOptions(current_date="2026-12-03"))
    lark = turn_grammar(LONG, max_reasoning=4)
    times = time_masks()
    rows = []
    for batch in (int(b) for b in args.batch.split(",")):
        for rep in range(args.reps):  # interleaved: with and without, in turn
            for name, grammar in (("none", None), ("schema", lark)):
                rate = decode_rate(llm, prompt, batch, args.gen_len, grammar)
                rows.append({"batch": batch, "rep": rep, "constraint": name, "tok_s": rate})
                print(json.dumps(rows[-1]), flush=True)
    t = sorted(times)
    report["mask_us_median_p99"] = [round(statistics.median(t) * 1e6),
                                    round(t[int(0.99 * (len(t) - 1))] * 1e6)]  # fmt: skip
    report["mask_calls"] = len(t)
    report["decode"] = rows
    print(json.dumps(report, indent=None if args.json else 1))


if __name__ == "__main__":
    main()
