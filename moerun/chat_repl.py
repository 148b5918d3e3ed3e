"""`moerun chat`: a terminal chat in the harmony format, also usable with piped input.

The conversation is kept as OpenAI-style messages and re-rendered each turn (the renderer drops
finished chain-of-thought exactly as openai-harmony does). Commands: /effort low|medium|high,
/reset, /quit. Ctrl-C stops the current answer and keeps the chat going. With --tools, a tool
call is shown and the user types its result: the agent loop by hand.
"""

import json
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Protocol, TextIO

from moerun.errors import MoerunError
from moerun.harmony.accumulate import MessageAccumulator
from moerun.harmony.parser import (
    ContentDelta,
    Done,
    Event,
    HarmonyParser,
    ReasoningDelta,
    ToolCallDelta,
    ToolCallStart,
)
from moerun.harmony.render import EFFORTS, RenderError, RenderOptions, render_prompt
from moerun.sampling import SamplingParams

DIM, RESET = "\033[2m", "\033[0m"


class TokenStream(Protocol):
    """What the chat needs from the engine: stream the deltas of one prompt (LLM.stream)."""

    def stream(self, prompt: list[int], params: SamplingParams) -> Iterator: ...


@dataclass
class ChatSession:
    llm: TokenStream
    effort: str = "medium"
    system: str | None = None
    tools: list[dict] = field(default_factory=list)
    show_reasoning: bool = False
    params: SamplingParams = field(default_factory=SamplingParams)
    color: bool = False
    messages: list[dict] = field(default_factory=list)

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.system}] if self.system else []

    def prompt(self) -> list[int]:
        options = RenderOptions(
            reasoning_effort=self.effort, current_date=time.strftime("%Y-%m-%d")
        )
        return render_prompt(self.messages, self.tools, options)

    def reply(self, out: TextIO) -> dict:
        """Generate one assistant message, streaming it to `out`; Ctrl-C cuts it short."""
        msg = MessageAccumulator()
        parser = HarmonyParser()
        stream = self.llm.stream(self.prompt(), self.params)
        try:
            for delta in stream:
                for token in delta.token_ids:
                    self._take(parser.feed(token), msg, out)
        except KeyboardInterrupt:
            out.write("\n[stopped]")
        finally:
            stream.close()  # aborts the request if it is still running
        self._take(parser.finish(), msg, out)
        out.write("\n")
        out.flush()
        return {k: v for k, v in msg.message().items() if v}  # parts it wrote, for the next turn

    def _take(self, events: list[Event], msg: MessageAccumulator, out: TextIO) -> None:
        for event in events:
            msg.feed(event)
            self._show(event, msg, out)

    def _show(self, event: Event, msg: MessageAccumulator, out: TextIO) -> None:
        if isinstance(event, ReasoningDelta):
            if self.show_reasoning:
                out.write(f"{DIM}{event.text}{RESET}" if self.color else event.text)
        elif isinstance(event, ContentDelta):
            out.write(event.text)
        elif isinstance(event, ToolCallStart):
            out.write(f"\n[tool call] {event.name}(")
        elif isinstance(event, ToolCallDelta):
            out.write(event.arguments)
        elif isinstance(event, Done) and msg.tool_calls:
            out.write(")")
        out.flush()


def _command(session: ChatSession, line: str, out: TextIO) -> bool:
    """Handle a /command; returns False to quit."""
    word, _, arg = line.partition(" ")
    if word in ("/quit", "/exit"):
        return False
    if word == "/reset":
        session.reset()
        out.write("[conversation cleared]\n")
    elif word == "/effort" and arg.strip() in EFFORTS:
        session.effort = arg.strip()
        out.write(f"[reasoning effort: {session.effort}]\n")
    else:
        out.write("[commands: /effort low|medium|high, /reset, /quit]\n")
    return True


def run_chat(session: ChatSession, read: Callable[[str], str], out: TextIO) -> None:
    """The loop: read a line, answer it; after a tool call ask the user for each result."""
    session.reset()
    while True:
        try:
            line = read("> ").strip()
        except (EOFError, KeyboardInterrupt):
            out.write("\n")
            return
        if not line:
            continue
        if line.startswith("/"):
            if not _command(session, line, out):
                return
            continue
        session.messages.append({"role": "user", "content": line})
        reply = session.reply(out)
        session.messages.append(reply)
        while reply.get("tool_calls"):
            for call in reply["tool_calls"]:
                try:
                    result = read(f"result of {call['function']['name']}> ")
                except (EOFError, KeyboardInterrupt):
                    return
                session.messages.append({"role": "tool", "tool_call_id": call["id"],
                                         "content": result})  # fmt: skip
            reply = session.reply(out)
            session.messages.append(reply)


def load_tools(path: str) -> list[dict]:
    """A JSON list of OpenAI function tools (or of bare function definitions), checked now by
    rendering them once, so that a bad file fails at start-up with its name, not mid-chat."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise MoerunError(f"--tools {path}: {e}") from None
    if not isinstance(data, list):
        raise MoerunError(f"--tools {path}: expected a JSON list of tools")
    tools = [t if isinstance(t, dict) and "type" in t else {"type": "function", "function": t}
             for t in data]  # fmt: skip
    try:
        render_prompt([], tools)
    except RenderError as e:
        raise MoerunError(f"--tools {path}: {e}") from None
    return tools


def read_line(prompt: str) -> str:
    """input() on a terminal; plain lines (echoed) when stdin is a pipe."""
    if sys.stdin.isatty():
        return input(prompt)
    line = sys.stdin.readline()
    if not line:
        raise EOFError
    sys.stdout.write(prompt + line)
    return line.rstrip("\n")
