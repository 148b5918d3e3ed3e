"""Evaluate the demo model on held-out conversations, generating with moerun's engine.

    TIKTOKEN_ENCODINGS_BASE=... .venv/bin/python scripts/eval_demo.py [--conversations 300]
        [--split heldout|all] [--temperature 0] [--model demo] [--json]

Held out: a seed training never used, so new cities, numbers, tool sets and dates in new
combinations; with `--split heldout` (the default) also user phrasings training never saw.
Reports: well-formed harmony (openai-harmony parses the turn, which ends in <|return|> or
<|call|>), tool-call rate when a declared tool fits, correct name and exact arguments, answers
that quote the tool's result, no call when no tool fits, and the mean analysis length per effort.
"""

import argparse
import json

from moerun.demo.conversations import heldout_turns
from moerun.demo.evaluate import evaluate


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="demo")
    p.add_argument("--conversations", type=int, default=300)
    p.add_argument("--split", choices=("heldout", "all"), default="heldout")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    from moerun import LLM

    llm = LLM(args.model, dtype=args.dtype)
    report = evaluate(llm, heldout_turns(args.conversations, args.split), args.temperature)
    if args.json:
        print(json.dumps(report, indent=2))
        return
    for metric, value in report.items():
        if isinstance(value, dict) and "rate" in value:
            print(f"{metric:40s} {100 * value['rate']:6.1f}%  (n={value['n']})")
        elif isinstance(value, dict):
            print(f"{metric:40s} " + "  ".join(f"{k} {v:.1f}" for k, v in value.items()))
        else:
            print(f"{metric:40s} {value:.2f}x")


if __name__ == "__main__":
    main()
