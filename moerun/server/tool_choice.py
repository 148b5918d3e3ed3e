"""`tool_choice`, tools and the response format of both APIs -> the constraint over the turn.

Chat Completions names a function as {"type": "function", "function": {"name": N}}, Responses
as {"type": "function", "name": N}; both accept "auto", "none" and "required". A request with
function tools or a response format gets a grammar over the whole assistant turn
(moerun.harmony.structured.turn_grammar): a call can only name a declared tool, with JSON
arguments (matching the parameters of a `"strict": true` tool); "required" and a named choice
rule out the final answer but still let the model reason first. Anything else gets at most the
reasoning budget.
"""

import functools
from collections.abc import Callable
from typing import Any

from moerun.harmony.budget import ReasoningBudget
from moerun.harmony.structured import (
    TEXT,
    GrammarConstraint,
    check_grammar,
    json_rule,
    turn_grammar,
)
from moerun.server.errors import APIError
from moerun.server.protocol import NamedToolChoice
from moerun.server.state import ServerState

ToolChoice = str | NamedToolChoice | dict[str, Any] | None


def turn_constraint(
    state: ServerState,
    tool_choice: ToolChoice,
    tools: list[dict],
    answer: dict | str | None = TEXT,
    budget: int | None = None,
    param: str = "response_format",
) -> Callable | None:
    """SamplingParams.constraint of a request. tools: {"name", "parameters", "strict"} each
    (both APIs' shapes flattened), already empty for tool_choice "none". answer: TEXT without a
    response format, else its schema (None: any JSON object). budget: max_reasoning_tokens.
    Every schema is compiled here, so one that llguidance refuses is a 400 naming it before
    anything is queued."""
    calls = _callable(tool_choice, tools)
    limit = state.max_reasoning_tokens if budget is None else budget
    if not calls and answer == TEXT:
        return None if limit is None else functools.partial(ReasoningBudget, limit)
    for name, schema in calls.items():
        _check(f"start: {json_rule(schema)}", f"invalid parameters of tool {name!r}", "tools")
    if answer != TEXT:
        _check(f"start: {json_rule(answer)}", "invalid JSON schema", param)
    final = tool_choice in (None, "auto", "none")
    lark = turn_grammar(answer, calls, final, limit)
    _check(lark, "invalid JSON schema", param)
    return functools.partial(GrammarConstraint, lark)


def _callable(tool_choice: ToolChoice, tools: list[dict]) -> dict[str, dict | None]:
    """The tools the model may call: name -> its arguments' schema (None: any JSON object);
    a 400 for a choice the tools cannot meet."""
    schemas = {t["name"]: t.get("parameters") if t.get("strict") else None for t in tools}
    if tool_choice in (None, "auto", "none"):
        return schemas
    if tool_choice == "required":
        if not tools:
            raise APIError(400, "tool_choice 'required' needs tools", param="tool_choice")
        return schemas
    name = chosen_name(tool_choice)
    if name not in schemas:
        raise APIError(400, f"tool_choice names unknown function {name!r}", param="tool_choice")
    return {name: schemas[name]}


def _check(lark: str, what: str, param: str) -> None:
    try:
        check_grammar(lark)
    except ValueError as e:
        raise APIError(400, f"{what}: {e}", param=param) from None


def chosen_name(tool_choice: NamedToolChoice | dict[str, Any]) -> str | None:
    """The function a named tool_choice names (its shape checked: a 400 otherwise)."""
    if isinstance(tool_choice, NamedToolChoice):  # pydantic checked the Chat form's shape
        return tool_choice.function.get("name")
    name = tool_choice.get("name")
    if tool_choice.get("type") != "function" or not isinstance(name, str):
        raise APIError(
            400,
            "tool_choice must be 'auto', 'none', 'required' or "
            '{"type": "function", "name": ...}',
            param="tool_choice",
        )
    return name
