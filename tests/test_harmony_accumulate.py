"""MessageAccumulator: parser events of a whole completion -> the OpenAI chat message."""

from server_utils import harmony_tokens

from moerun.harmony.accumulate import MessageAccumulator
from moerun.harmony.parser import HarmonyParser
from moerun.harmony.render import render_prompt

THOUGHT = harmony_tokens("<|channel|>", "analysis", "<|message|>", "Two cities.", "<|end|>")
PREAMBLE = harmony_tokens(
    "<|start|>", "assistant", "<|channel|>", "commentary", "<|message|>", "Checking.", "<|end|>"
)


def call(args: str, end: str) -> list[int]:
    header = ("<|start|>", "assistant", "<|channel|>", "commentary to=functions.weather ")
    return harmony_tokens(*header, "<|constrain|>", "json", "<|message|>", args, end)


def accumulate(tokens: list[int], reason: str | None = None) -> MessageAccumulator:
    calls = iter(["call_a", "call_b"])
    parser, acc = HarmonyParser(new_call_id=lambda: next(calls)), MessageAccumulator()
    for event in [e for t in tokens for e in parser.feed(t)] + parser.finish(reason):
        acc.feed(event)
    return acc


def test_reasoning_preamble_and_two_calls():
    paris, oslo = '{"city": "Paris"}', '{"city": "Oslo"}'
    acc = accumulate(THOUGHT + PREAMBLE + call(paris, "<|end|>") + call(oslo, "<|call|>"))
    assert acc.finish_reason == "tool_calls"
    assert acc.message() == {
        "role": "assistant",
        "content": "Checking.",
        "reasoning_content": "Two cities.",
        "tool_calls": [
            {"id": "call_a", "type": "function",
             "function": {"name": "weather", "arguments": paris}},
            {"id": "call_b", "type": "function",
             "function": {"name": "weather", "arguments": oslo}},
        ],
    }  # fmt: skip
    render_prompt([{"role": "user", "content": "Hi"}, acc.message()])  # renders back as is


def test_answer_only_and_cut_short():
    acc = accumulate(
        harmony_tokens("<|channel|>", "final", "<|message|>", "Hi", " there"), "length"
    )
    assert acc.finish_reason == "length"
    assert acc.message() == {
        "role": "assistant",
        "content": "Hi there",
        "reasoning_content": None,
        "tool_calls": None,
    }
    empty = accumulate([])
    assert empty.finish_reason == "stop" and empty.message()["content"] is None
