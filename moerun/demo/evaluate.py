"""Scores the demo model's turns on held-out conversations (scripts/eval_demo.py prints them;
tests/test_demo_model.py holds the model to them): well-formed harmony (openai-harmony parses the
turn, which ends in <|return|> or <|call|>), tool-call rate when a declared tool fits, correct
name and exact arguments, answers that quote the tool's result, no call when no tool fits, and
the mean analysis length per reasoning effort.
"""

import json
from collections import defaultdict

from moerun.demo.conversations import Turn
from moerun.harmony.render import EFFORTS
from moerun.sampling import SamplingParams

CALL, RETURN = 200012, 200002


def parse(tokens: list[int]):
    """openai-harmony's messages of a completed turn, or None if it is not well-formed."""
    from openai_harmony import HarmonyEncodingName, Role, load_harmony_encoding

    if not tokens or tokens[-1] not in (CALL, RETURN):
        return None
    enc = load_harmony_encoding(HarmonyEncodingName.HARMONY_GPT_OSS)
    try:
        messages = enc.parse_messages_from_completion_tokens(tokens, Role.ASSISTANT)
    except Exception:  # any parse error is what this counts
        return None
    last = messages[-1] if messages else None
    if last is None or (tokens[-1] == CALL) != bool(last.recipient):
        return None
    return messages


def score(turn: Turn, tokens: list[int], tally: dict, lengths: dict) -> None:
    """Add one generated turn to the tallies (counts of hits over tries per metric)."""

    def count(metric: str, ok: bool) -> None:
        tally[metric][0] += ok
        tally[metric][1] += 1

    messages = parse(tokens)
    count("well-formed harmony", messages is not None)
    if messages is None:
        return
    analysis = [m for m in messages if m.channel == "analysis"]
    if analysis:
        from moerun.harmony.tokenizer import load_tokenizer

        text = "".join(c.text for c in analysis[0].content)
        lengths[turn.effort].append(len(load_tokenizer().encode_ordinary(text)))
    last = messages[-1]
    called = last.recipient.removeprefix("functions.") if last.recipient else None
    if turn.kind == "call":
        count("tool called when one fits", called is not None)
        try:
            args = json.loads(last.content[0].text) if called else None
        except json.JSONDecodeError:
            args = None
        count("correct tool name and arguments", (called, args) == turn.call)
    elif turn.kind == "answer":
        count(
            "answer quotes the tool result", called is None and turn.quote in last.content[0].text
        )
    else:
        count(f"no call when none fits ({turn.kind})", called is None)
        if turn.kind == "direct" and called is None:
            count("direct answer exact", last.content[0].text == turn.final)


def evaluate(llm, turns: list[Turn], temperature: float, seed: int = 0) -> dict:
    params = [SamplingParams(temperature=temperature, max_tokens=300, seed=seed + i)
              for i in range(len(turns))]  # fmt: skip
    outputs = llm.generate([t.prompt() for t in turns], params)
    tally: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    lengths: dict[str, list[int]] = defaultdict(list)
    for turn, out in zip(turns, outputs, strict=True):
        score(turn, out.token_ids, tally, lengths)
    report = {m: {"rate": hit / n, "n": n} for m, (hit, n) in sorted(tally.items())}
    mean = {e: sum(lengths[e]) / max(1, len(lengths[e])) for e in EFFORTS}
    report["mean analysis tokens"] = mean
    report["high / low analysis length"] = mean["high"] / max(mean["low"], 1e-9)
    return report
