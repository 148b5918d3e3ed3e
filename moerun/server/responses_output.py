"""Harmony events -> Responses API output items, and the streaming events that build them.

One output item per harmony message: analysis -> `reasoning`, answer or preamble -> `message`, a
function call -> `function_call`. The streaming events (without `sequence_number`, which the SSE
writer adds) are returned by `feed`; the non-streaming path ignores them and reads `items`.
"""

import uuid

from moerun.harmony.parser import (
    ContentDelta,
    Done,
    Event,
    MessageEnd,
    ReasoningDelta,
    ToolCallDelta,
    ToolCallStart,
)


def _id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


class OutputBuilder:
    """An item stays open after its harmony message ends until the next event shows whether
    max_output_tokens cut the output there (status "incomplete") or not ("completed")."""

    def __init__(self) -> None:
        self.items: list[dict] = []
        self.finish_reason: str | None = None  # from Done: "stop" | "length" | "tool_calls"
        self._open: dict | None = None  # the item being written; its text is in self._text
        self._text: list[str] = []
        self._ended = False  # the open item's harmony message is over

    def feed(self, event: Event) -> list[dict]:
        if isinstance(event, MessageEnd):
            self._ended = self._open is not None
            return []
        if isinstance(event, Done):
            self.finish_reason = event.finish_reason
            cut = event.finish_reason in ("length", "abort")
            return self._close("incomplete" if cut else "completed")
        out = self._close("completed") if self._ended else []
        if isinstance(event, ToolCallStart):
            item = {
                "type": "function_call",
                "id": _id("fc"),
                "call_id": event.id,
                "name": event.name,
                "arguments": "",
                "status": "in_progress",
            }
            return out + self._close("completed") + self._start(item)
        if isinstance(event, ToolCallDelta):
            if self._open is None or self._open["type"] != "function_call":
                return out  # the parser starts every call first; nothing to attach this to
            return out + self._append(event.arguments)
        if isinstance(event, ReasoningDelta | ContentDelta):
            kind = "reasoning" if isinstance(event, ReasoningDelta) else "message"
            if self._open is None or self._open["type"] != kind:
                out += self._close("completed") + self._start(_new_item(kind))
            return out + self._append(event.text)
        return out

    # ---- one item's events ---------------------------------------------------------------------
    def _where(self) -> dict:
        assert self._open is not None
        return {"item_id": self._open["id"], "output_index": len(self.items) - 1}

    def _start(self, item: dict) -> list[dict]:
        self.items.append(item)
        self._open, self._text, self._ended = item, [], False
        out = [
            {
                "type": "response.output_item.added",
                "output_index": len(self.items) - 1,
                "item": dict(item),
            }
        ]
        part = _part(item["type"], "")
        if part is not None:
            out.append(
                {
                    "type": "response.content_part.added",
                    **self._where(),
                    "content_index": 0,
                    "part": part,
                }
            )
        return out

    def _append(self, text: str) -> list[dict]:
        self._text.append(text)
        kind = self._open["type"] if self._open else None
        if kind == "function_call":
            return [
                {"type": "response.function_call_arguments.delta", **self._where(), "delta": text}
            ]
        event = {
            "type": f"response.{_TEXT_EVENT[kind]}.delta",
            **self._where(),
            "content_index": 0,
            "delta": text,
        }
        if kind == "message":
            event["logprobs"] = []
        return [event]

    def _close(self, status: str) -> list[dict]:
        item = self._open
        if item is None:
            return []
        where, text = self._where(), "".join(self._text)
        self._open, self._text, self._ended = None, [], False
        if item["type"] == "function_call":
            item.update(arguments=text, status=status)
            done = [{"type": "response.function_call_arguments.done", **where, "arguments": text}]
        else:
            part = _part(item["type"], text)
            item["content"] = [part]
            if item["type"] == "message":
                item["status"] = status
            text_done = {
                "type": f"response.{_TEXT_EVENT[item['type']]}.done",
                **where,
                "content_index": 0,
                "text": text,
            }
            if item["type"] == "message":
                text_done["logprobs"] = []
            part_done = {
                "type": "response.content_part.done",
                **where,
                "content_index": 0,
                "part": part,
            }
            done = [text_done, part_done]
        index = where["output_index"]
        return [*done, {"type": "response.output_item.done", "output_index": index, "item": item}]


_TEXT_EVENT = {"reasoning": "reasoning_text", "message": "output_text"}


def _new_item(kind: str) -> dict:
    if kind == "reasoning":
        return {"type": "reasoning", "id": _id("rs"), "summary": [], "content": []}
    return {
        "type": "message",
        "id": _id("msg"),
        "role": "assistant",
        "status": "in_progress",
        "content": [],
    }


def _part(kind: str, text: str) -> dict | None:
    if kind == "reasoning":
        return {"type": "reasoning_text", "text": text}
    if kind == "message":
        return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
    return None
