"""Responses API input items -> the OpenAI chat-style messages that render_prompt takes.

The items of one assistant turn (reasoning, a message, function calls) fold into one assistant
message while they come in the order render_prompt writes them back (analysis, then text, then
calls); an item out of that order starts a new assistant message, so the rendered harmony messages
keep the order of the items. Errors name the item by its index in the request's `input`.
"""

import re
from typing import Any

from moerun.server.errors import APIError

ROLES = ("user", "assistant", "system", "developer")
TEXT_PARTS = ("input_text", "output_text", "text")
_NAME = re.compile(r"[A-Za-z0-9_-]+")  # the names render_prompt accepts in a harmony header


def input_items(raw: str | list[dict[str, Any]]) -> list[dict[str, Any]]:
    """`input` as a list of items: a string is one user message."""
    if isinstance(raw, str):
        return [{"type": "message", "role": "user", "content": raw}]
    return list(raw)


def to_messages(items: list[Any], first_new: int = 0) -> list[dict]:
    """Chat messages for `items`. Items before `first_new` come from a stored response (checked
    when they were stored); error messages count the others from 0, as the request's `input`."""
    messages: list[dict] = []
    turn: dict | None = None  # the assistant message the next assistant items may join
    call_ids: set[str] = set()
    for i, item in enumerate(items):
        # an item of the stored conversation is named as such, never as input[-1]
        where = f"input[{i - first_new}]" if i >= first_new else f"previous_response_id item {i}"
        if not isinstance(item, dict):
            raise _bad(where, "an item must be an object")
        kind = item.get("type", "message" if "role" in item else None)
        if kind == "reasoning":
            text = _reasoning_text(item, where)
            if text:
                turn = _turn(messages, turn, ("reasoning", "content", "tool_calls"))
                turn["reasoning"] = text
        elif kind == "message" and item.get("role") == "assistant":
            turn = _turn(messages, turn, ("content", "tool_calls"))
            turn["content"] = _text(item.get("content"), f"{where}.content")
        elif kind == "function_call":
            call = _function_call(item, where)
            call_ids.add(call["id"])
            turn = _turn(messages, turn, ())
            turn.setdefault("tool_calls", []).append(call)
        elif kind == "function_call_output":
            messages.append(_call_output(item, where, call_ids))
            turn = None
        elif kind == "message":
            messages.append(_message(item, where))
            turn = None
        else:
            raise _bad(where, f"unsupported item type {kind!r}", "type")
    return messages


def _turn(messages: list[dict], turn: dict | None, blocked: tuple[str, ...]) -> dict:
    """`turn`, unless it already holds something the item must not follow: then a new one."""
    if turn is None or any(key in turn for key in blocked):
        turn = {"role": "assistant"}
        messages.append(turn)
    return turn


def _message(item: dict, where: str) -> dict:
    role = item.get("role")
    if role not in ROLES:
        raise _bad(where, f"role must be one of {', '.join(ROLES)}, not {role!r}", "role")
    return {"role": role, "content": _text(item.get("content"), f"{where}.content")}


def _function_call(item: dict, where: str) -> dict:
    call_id, name, args = item.get("call_id"), item.get("name"), item.get("arguments")
    if not isinstance(call_id, str) or not call_id:
        raise _bad(where, "a function_call needs a string 'call_id'", "call_id")
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise _bad(where, f"name must be letters, digits, '_' or '-', not {name!r}", "name")
    if not isinstance(args, str):
        raise _bad(where, "arguments must be a string (JSON text)", "arguments")
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": args}}


def _call_output(item: dict, where: str, call_ids: set[str]) -> dict:
    call_id = item.get("call_id")
    if not isinstance(call_id, str) or not call_id:
        raise _bad(where, "a function_call_output needs a string 'call_id'", "call_id")
    if call_id not in call_ids:
        raise _bad(where, f"no function_call with call_id {call_id!r} comes before it", "call_id")
    output = _text(item.get("output"), f"{where}.output")
    return {"role": "tool", "tool_call_id": call_id, "content": output}


def _reasoning_text(item: dict, where: str) -> str:
    """The reasoning's full text (`content`); a summary stands in when only that was kept."""
    content = item.get("content")
    if content:
        return _parts(content, f"{where}.content", ("reasoning_text",))
    return _parts(item.get("summary") or [], f"{where}.summary", ("summary_text",))


def _text(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if content is None:
        raise APIError(400, f"{where} is required", param=where)
    return _parts(content, where, TEXT_PARTS)


def _parts(parts: Any, where: str, kinds: tuple[str, ...]) -> str:
    if not isinstance(parts, list):
        raise APIError(400, f"{where} must be a string or a list of parts", param=where)
    texts = []
    for j, part in enumerate(parts):
        kind = part.get("type") if isinstance(part, dict) else type(part).__name__
        if kind not in kinds:
            raise APIError(
                400, f"{where}[{j}]: unsupported part type {kind!r}", param=f"{where}[{j}]"
            )
        if not isinstance(part.get("text"), str):
            raise APIError(400, f"{where}[{j}] needs a string 'text'", param=f"{where}[{j}]")
        texts.append(part["text"])
    return "".join(texts)


def _bad(where: str, message: str, field: str | None = None) -> APIError:
    param = f"{where}.{field}" if field else where
    return APIError(400, f"{where}: {message}", param=param)
