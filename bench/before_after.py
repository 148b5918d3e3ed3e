"""moerun against an earlier moerun on the same checkpoint, measured in one run (issue 12's proof
that a redesign kept its speed).

    git worktree add /tmp/moerun-before <commit>
    python bench/before_after.py --model /tmp/full20b --before /tmp/moerun-before [--reps 2] \\
        [--prompt-len 512] [--gen-len 32] [--dtype bfloat16] [--dense-weights int8] [--json OUT]

Each run is bench/compare_cpu.py's moerun worker (`moerun.bench.bench` at batch 1: TTFT of a
--prompt-len prompt, then --gen-len greedy tokens) in its own process, the two source trees
interleaved (after, before, after, before, ...) so that a slow minute of the host hits both.
The earlier tree is imported through PYTHONPATH; each worker reports which tree it ran. Prints
every repetition, the medians, after / before, and the host's read bandwidth.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
KEYS = ("prefill_tok_s", "decode_tok_s", "ttft_s", "peak_rss_gib")


def run_worker(
    tree: Path, model: str, prompt_len: int, gen_len: int, dtype: str, dense: str
) -> dict:
    """compare_cpu's moerun worker with `tree` first on the import path."""
    code = (
        "import json, sys, moerun; sys.path.insert(0, sys.argv[1]); import compare_cpu; "
        "r = compare_cpu.worker_moerun(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), "
        "sys.argv[5], sys.argv[6]); r['tree'] = moerun.__file__; print(json.dumps(r))"
    )
    env = {**os.environ, "PYTHONPATH": str(tree)}
    args = [str(HERE), model, str(prompt_len), str(gen_len), dtype, dense]
    # cwd = tree too: `python -c` puts the working directory first on the import path
    out = subprocess.run([sys.executable, "-c", code, *args], env=env, cwd=tree,
                         stdout=subprocess.PIPE, text=True, check=True)  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])


def table(runs: dict[str, list[dict]]) -> str:
    lines = [f"{'':8}{'rep':>4}" + "".join(f"{k:>15}" for k in KEYS) + "  tree"]
    for name, reps in runs.items():
        for i, r in enumerate(reps):
            lines.append(f"{name:8}{i:>4}" + "".join(f"{r[k]:>15.3f}" for k in KEYS)
                         + f"  {Path(r['tree']).parent.parent}")  # fmt: skip
    med = {n: {k: statistics.median(r[k] for r in reps) for k in KEYS} for n, reps in runs.items()}
    for name in runs:
        lines.append(f"{name:8}{'med':>4}" + "".join(f"{med[name][k]:>15.3f}" for k in KEYS))
    lines.append(f"{'after/before':12}" + "".join(
        f"{med['after'][k] / med['before'][k]:>15.3f}" for k in KEYS))  # fmt: skip
    bw = runs["after"][0]
    lines.append(f"host read bandwidth {bw['read_bandwidth_gbs']} GB/s, {bw['threads']} threads")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--before", type=Path, required=True, help="the earlier source tree")
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--gen-len", type=int, default=32)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--dense-weights", default="bf16", choices=("bf16", "int8"))
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    trees = {"after": HERE.parent, "before": args.before.resolve()}
    runs: dict[str, list[dict]] = {"after": [], "before": []}
    for rep in range(args.reps):
        for name, tree in trees.items():
            print(f"[before_after] {name} rep {rep}", file=sys.stderr, flush=True)
            runs[name].append(run_worker(tree, args.model, args.prompt_len, args.gen_len,
                                         args.dtype, args.dense_weights))  # fmt: skip
    print(table(runs))
    if args.json:
        args.json.write_text(json.dumps({"args": vars(args) | {"before": str(args.before)},
                                         "runs": runs}, indent=2, default=str) + "\n")  # fmt: skip


if __name__ == "__main__":
    main()
