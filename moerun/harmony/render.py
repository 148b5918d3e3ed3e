"""OpenAI-style chat messages and function tools -> a harmony prompt, as token ids (spec §5).

Token-for-token equal to openai-harmony's `render_conversation_for_completion(convo,
Role.ASSISTANT)`; tests/test_harmony_render.py checks it against that library.
"""

import json
import re
from dataclasses import dataclass
from typing import Any, NamedTuple

from moerun.errors import MoerunError
from moerun.harmony.schema_ts import FunctionTool, functions_section
from moerun.harmony.tokenizer import SPECIAL_TOKENS, load_tokenizer

START, END, MESSAGE = (SPECIAL_TOKENS[t] for t in ("<|start|>", "<|end|>", "<|message|>"))
CHANNEL, CONSTRAIN, CALL = (SPECIAL_TOKENS[t] for t in ("<|channel|>", "<|constrain|>", "<|call|>"))
EFFORTS = ("low", "medium", "high")
TEXT_PARTS = ("text", "input_text", "output_text")
VALID_CHANNELS = (
    "# Valid channels: analysis, commentary, final. Channel must be included for every message."
)
FUNCTIONS_CHANNEL = "Calls to these tools must go to the commentary channel: 'functions'."
_NAME = re.compile(r"[A-Za-z0-9_-]+")  # OpenAI's function-name charset; keeps headers parseable
_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")


class RenderError(MoerunError, ValueError):
    """Bad chat input: unknown role, unknown tool call id, bad tool schema, bad option value."""


@dataclass(frozen=True)
class RenderOptions:
    reasoning_effort: str = "medium"  # low | medium | high
    current_date: str | None = None  # "YYYY-MM-DD"; the CLI/server pass today's date
    model_identity: str = "You are ChatGPT, a large language model trained by OpenAI."
    knowledge_cutoff: str = "2024-06"

    def __post_init__(self) -> None:
        if self.reasoning_effort not in EFFORTS:
            raise RenderError(
                f"reasoning effort must be low, medium or high, not {self.reasoning_effort!r}"
            )
        if self.current_date is not None and not _DATE.fullmatch(self.current_date):
            raise RenderError(f"current date must be YYYY-MM-DD, not {self.current_date!r}")


class Msg(NamedTuple):
    """One harmony message before tokenization."""

    author: str  # a role, or for a tool result the tool's name ("functions.get_weather")
    text: str
    channel: str | None = None
    recipient: str | None = None
    json_call: bool = False  # content type ` <|constrain|>json` (function-call arguments)


class ResponseFormat(NamedTuple):
    """A structured output's schema, shown to the model in the developer message."""

    name: str
    schema: dict
    description: str | None = None


def response_format_section(fmt: ResponseFormat) -> str:
    """The harmony guide's `# Response Formats` section (spec §5.4)."""
    lines = ["# Response Formats", "", f"## {fmt.name}", ""]
    if fmt.description:
        lines.append(f"// {fmt.description}")
    return "\n".join([*lines, json.dumps(fmt.schema, separators=(",", ":"))])


def render_prompt(
    messages: list[dict],
    tools: list[dict] | None = None,
    options: RenderOptions = RenderOptions(),
    response_format: ResponseFormat | None = None,
) -> list[int]:
    """Prompt token ids ready for completion: the conversation followed by <|start|>assistant."""
    functions = [_function_tool(i, tool) for i, tool in enumerate(tools or [])]
    instructions, convo = _conversation(messages)
    header = [Msg("system", _system_text(options, bool(functions)))]
    if instructions or functions or response_format:
        sections = ["# Instructions", instructions] if instructions else []
        try:
            sections += [functions_section(functions)] if functions else []
            sections += [response_format_section(response_format)] if response_format else []
        except ValueError as e:  # a default that JSON cannot hold (NaN, 1e400)
            raise RenderError(f"tools: bad parameters schema: {e}") from None
        header.append(Msg("developer", "\n\n".join(sections)))
    ids: list[int] = []
    for msg in header + drop_finished_cot(convo):
        ids += encode_message(msg)
    return ids + [START] + load_tokenizer().encode_ordinary("assistant")


def drop_finished_cot(convo: list[Msg]) -> list[Msg]:
    """openai-harmony's auto_drop_analysis: when the last assistant message is on `final` (the
    turn is over), drop every `analysis` message before the first `final` one. During a tool-call
    loop nothing is dropped, so the model sees the reasoning behind its calls. Only CoT before the
    *first* final goes (a later turn's CoT stays); odd, but the library does that, so do we."""
    last = next((m for m in reversed(convo) if m.author == "assistant"), None)
    if last is None or last.channel != "final":
        return convo
    first_final = next(i for i, m in enumerate(convo) if m.channel == "final")
    return [m for i, m in enumerate(convo) if i >= first_final or m.channel != "analysis"]


def encode_message(msg: Msg) -> list[int]:
    """`<|start|>{author}[ to=R][<|channel|>C][ <|constrain|>json]<|message|>{text}<|end|>`.

    Each header piece is encoded on its own, as harmony does; BPE across pieces would differ."""
    enc = load_tokenizer()
    ids = [START] + enc.encode_ordinary(msg.author)
    if msg.recipient is not None:
        ids += enc.encode_ordinary(f" to={msg.recipient}")
    if msg.channel is not None:
        ids += [CHANNEL] + enc.encode_ordinary(msg.channel)
    if msg.json_call:
        ids += enc.encode_ordinary(" ") + [CONSTRAIN] + enc.encode_ordinary("json")
    ids += [MESSAGE] + enc.encode_ordinary(msg.text)
    is_call = msg.author == "assistant" and msg.recipient is not None
    return ids + [CALL if is_call else END]


def _system_text(options: RenderOptions, has_functions: bool) -> str:
    top = [options.model_identity, f"Knowledge cutoff: {options.knowledge_cutoff}"]
    if options.current_date:
        top.append(f"Current date: {options.current_date}")
    channels = VALID_CHANNELS + (f"\n{FUNCTIONS_CHANNEL}" if has_functions else "")
    return "\n\n".join(["\n".join(top), f"Reasoning: {options.reasoning_effort}", channels])


def _conversation(messages: list[dict]) -> tuple[str, list[Msg]]:
    """(developer instructions from every system/developer message, the other messages)."""
    instructions: list[str] = []
    convo: list[Msg] = []
    call_names: dict[str, str] = {}  # tool_call_id -> function name, to name the results
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise RenderError(f"{where} must be an object")
        role = message.get("role")
        if role in ("system", "developer"):
            if text := _text(message.get("content"), f"{where}.content"):
                instructions.append(text)
        elif role == "user":
            convo.append(Msg("user", _text(message.get("content"), f"{where}.content")))
        elif role == "assistant":
            convo += _assistant(message, where, call_names)
        elif role == "tool":
            convo.append(_tool_result(message, where, call_names))
        else:
            raise RenderError(f"{where}: unknown role {role!r}")
    return "\n\n".join(instructions), convo


def _assistant(message: dict, where: str, call_names: dict[str, str]) -> list[Msg]:
    """Reasoning -> analysis; content -> final, or a commentary preamble before tool calls."""
    out = []
    reasoning = message.get("reasoning_content") or message.get("reasoning")
    if reasoning:
        out.append(Msg("assistant", _text(reasoning, f"{where}.reasoning"), "analysis"))
    calls = message.get("tool_calls") or []
    if not isinstance(calls, list):
        raise RenderError(f"{where}.tool_calls must be a list")
    text = _text(message.get("content"), f"{where}.content")
    if text or not (calls or reasoning):
        out.append(Msg("assistant", text, "commentary" if calls else "final"))
    for j, call in enumerate(calls):
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict):
            raise RenderError(f"{where}.tool_calls[{j}] must have a 'function' object")
        name = _check_name(fn.get("name"), f"{where}.tool_calls[{j}].function.name")
        args = fn.get("arguments")
        if not isinstance(args, str):
            raise RenderError(f"{where}.tool_calls[{j}].function.arguments must be a JSON string")
        if isinstance(call.get("id"), str):
            call_names[call["id"]] = name
        out.append(Msg("assistant", args, "commentary", f"functions.{name}", json_call=True))
    return out


def _tool_result(message: dict, where: str, call_names: dict[str, str]) -> Msg:
    call_id = message.get("tool_call_id")
    name = call_names.get(call_id) if isinstance(call_id, str) else None
    if name is None:
        if message.get("name") is None:
            raise RenderError(f"{where}: tool result for unknown tool_call_id {call_id!r}")
        name = _check_name(message["name"], f"{where}.name")
    text = _text(message.get("content"), f"{where}.content")
    return Msg(f"functions.{name}", text, "commentary", "assistant")


def _function_tool(i: int, tool: Any) -> FunctionTool:
    """An OpenAI tool, `{"type": "function", "function": {...}}` or the Responses API flat form."""
    where = f"tools[{i}]"
    if not isinstance(tool, dict) or tool.get("type", "function") != "function":
        kind = tool.get("type") if isinstance(tool, dict) else tool
        raise RenderError(f"{where}: only function tools are supported, not {kind!r}")
    fn = tool.get("function", tool)
    if not isinstance(fn, dict):
        raise RenderError(f"{where}.function must be an object")
    name = _check_name(fn.get("name"), f"{where}.name")
    description = fn.get("description") or ""
    if not isinstance(description, str):
        raise RenderError(f"{where}.description must be a string")
    params = fn.get("parameters")
    if params is not None and not isinstance(params, dict):
        raise RenderError(f"{where}.parameters must be a JSON schema object")
    return FunctionTool(name, description, params)


def _check_name(name: Any, where: str) -> str:
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise RenderError(f"{where} must be letters, digits, '_' or '-', not {name!r}")
    return name


def _text(content: Any, where: str) -> str:
    """A string, None, or a list of text parts (joined with nothing, as harmony renders a
    message's several text contents back to back)."""
    if content is None or isinstance(content, str):
        return content or ""
    if not isinstance(content, list):
        raise RenderError(f"{where} must be a string or a list of text parts")
    texts = []
    for part in content:
        if not isinstance(part, dict) or part.get("type") not in TEXT_PARTS:
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            raise RenderError(f"{where}: unsupported part type {kind!r} (text only)")
        if not isinstance(part.get("text"), str):
            raise RenderError(f"{where}: a text part needs a string 'text'")
        texts.append(part["text"])
    return "".join(texts)
