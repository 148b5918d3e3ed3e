"""Stored responses: what `store: true` keeps, for `previous_response_id` and for the routes that
read them back (GET /v1/responses/{id}, its input_items, DELETE).

Input items get ids when stored, as OpenAI gives them, so that a listing pages the same way twice.
"""

import uuid
from dataclasses import dataclass

from moerun.server.errors import APIError

MAX_STORED = 1000  # finished responses kept; the oldest go first
_PREFIX = {
    "message": "msg",
    "function_call": "fc",
    "function_call_output": "fco",
    "reasoning": "rs",
}


@dataclass
class StoredResponse:
    items: list[dict]  # the conversation so far as input items: earlier turns, input, output
    instructions: str | None
    # the system message's date, kept for the whole chain (harmony's "conversation start
    # date"): a conversation that crosses midnight renders the same prefix, and keeps its cache
    date: str
    response: dict  # the finished response object, as it was returned
    num_input: int  # items[:num_input] are what generated it: earlier turns and the input


def store(
    stored: dict, response: dict, items: list[dict], instructions: str | None, date: str
) -> None:
    """Keep a finished response; `items` are its input (earlier turns included)."""
    inputs = [_with_id(item) for item in items]
    entry = StoredResponse(inputs + response["output"], instructions, date, response, len(inputs))
    stored[response["id"]] = entry
    while len(stored) > MAX_STORED:
        del stored[next(iter(stored))]  # dicts keep insertion order: the oldest first


def _with_id(item: dict) -> dict:
    """An input item as OpenAI lists it: with an id, a message's text as content parts."""
    kind = item.get("type", "message" if "role" in item else None)
    out = dict(item)
    if kind == "message":
        out["type"] = "message"
        if isinstance(item.get("content"), str):  # the same text, so the prompt renders the same
            part = "output_text" if item.get("role") == "assistant" else "input_text"
            out["content"] = [{"type": part, "text": item["content"]}]
    if "id" not in out:
        out["id"] = f"{_PREFIX.get(kind, 'item')}_{uuid.uuid4().hex}"
    return out


def lookup(stored: dict, response_id: str) -> StoredResponse:
    entry = stored.get(response_id)
    if not isinstance(entry, StoredResponse):
        raise APIError(404, f"Response with id '{response_id}' not found.")
    return entry


def delete(stored: dict, response_id: str) -> dict:
    lookup(stored, response_id)
    del stored[response_id]
    return {"id": response_id, "object": "response", "deleted": True}


def input_items(
    entry: StoredResponse, after: str | None, before: str | None, limit: int, order: str
) -> dict:
    """One page of the items that generated the response, OpenAI's cursor list shape."""
    items = entry.items[: entry.num_input]
    if order == "desc":
        items = items[::-1]
    ids = [item["id"] for item in items]
    start, end = 0, len(items)
    for cursor, name in ((after, "after"), (before, "before")):
        if cursor is not None and cursor not in ids:
            raise APIError(400, f"{name}: no input item with id '{cursor}'", param=name)
    if after is not None:
        start = ids.index(after) + 1
    if before is not None:
        end = ids.index(before)
    page = items[start:end][:limit]
    return {
        "object": "list",
        "data": page,
        "first_id": page[0]["id"] if page else None,
        "last_id": page[-1]["id"] if page else None,
        "has_more": start + len(page) < end,
    }
