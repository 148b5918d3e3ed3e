"""`moerun chat`: the loop with a scripted token source (plumbing), and the real CLI piped."""

import io
import subprocess
import sys

from server_utils import harmony_tokens

from moerun.chat_repl import ChatSession, run_chat
from moerun.engine.llm_engine import RequestOutput
from moerun.sampling import SamplingParams

from conftest import SMALL
from oracles import h_assistant, h_call, h_result, h_user, harmony_prompt, today

ANSWER = harmony_tokens(
    "<|channel|>",
    "analysis",
    "<|message|>",
    "Think.",
    "<|end|>",
    "<|start|>",
    "assistant",
    "<|channel|>",
    "final",
    "<|message|>",
    "Hi there!",
    "<|return|>",
)
CALL = harmony_tokens(
    "<|channel|>",
    "analysis",
    "<|message|>",
    "Need weather.",
    "<|end|>",
    "<|start|>",
    "assistant",
    "<|channel|>",
    "commentary to=functions.get_weather ",
    "<|constrain|>",
    "json",
    "<|message|>",
    '{"city":"Paris"}',
    "<|call|>",
)
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}


class Scripted:
    def __init__(self, scripts: list[list[int]]) -> None:
        self.scripts, self.prompts = list(scripts), []

    def stream(self, prompt: list[int], params: SamplingParams):
        self.prompts.append(prompt)
        for token in self.scripts.pop(0):
            yield RequestOutput("r", prompt, [token])


def _lines(*lines: str):
    it = iter(lines)

    def read(_: str) -> str:
        return next(it)  # StopIteration ends like EOF below

    def safe(prompt: str) -> str:
        try:
            return read(prompt)
        except StopIteration:
            raise EOFError from None

    return safe


def test_conversation_is_kept_and_cot_dropped_like_harmony():
    llm = Scripted([ANSWER, ANSWER])
    out = io.StringIO()
    session = ChatSession(llm, effort="low", show_reasoning=True)
    run_chat(session, _lines("Hello", "/effort high", "And now?", "/quit"), out)
    text = out.getvalue()
    assert "Think." in text and "Hi there!" in text and "[reasoning effort: high]" in text
    assert "<|" not in text
    convo = [h_user("Hello"), h_assistant("Think.", "analysis"),
             h_assistant("Hi there!", "final"), h_user("And now?")]  # fmt: skip
    expected = harmony_prompt(convo, "high", date=today())
    assert llm.prompts[1] == expected


def test_hidden_reasoning_and_reset():
    llm = Scripted([ANSWER, ANSWER])
    out = io.StringIO()
    run_chat(ChatSession(llm), _lines("Hello", "/reset", "Hello"), out)
    assert "Think." not in out.getvalue() and out.getvalue().count("Hi there!") == 2
    assert llm.prompts[0] == llm.prompts[1]  # /reset forgot the first exchange


def test_tool_call_loop_by_hand():
    llm = Scripted([CALL, ANSWER])
    out = io.StringIO()
    run_chat(ChatSession(llm, tools=[WEATHER]), _lines("Weather?", '{"temp": 20}', "/quit"), out)
    assert '[tool call] get_weather({"city":"Paris"})' in out.getvalue()
    convo = [
        h_user("Weather?"),
        h_assistant("Need weather.", "analysis"),
        h_call("get_weather", '{"city":"Paris"}'),
        h_result("get_weather", '{"temp": 20}'),
    ]
    expected = harmony_prompt(convo, tools=[WEATHER], date=today())
    assert llm.prompts[1] == expected  # CoT kept during the tool loop


def test_cli_with_piped_input(make_checkpoint):
    folder = make_checkpoint(SMALL.replace(vocab_size=201088), "hf", seed=4)
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "moerun.cli",
            "chat",
            "--model",
            str(folder),
            "--max-tokens",
            "5",
            "--dtype",
            "float32",
            "--reasoning-effort",
            "low",
        ],
        input="Hello\n/effort high\nMore\n/quit\n",
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    assert "> Hello" in run.stdout and "[reasoning effort: high]" in run.stdout
    assert "Traceback" not in run.stderr
