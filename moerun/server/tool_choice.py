"""`tool_choice` of both APIs -> the forced start of a function call (harmony builds the tokens).

Chat Completions names a function as {"type": "function", "function": {"name": N}}, Responses
as {"type": "function", "name": N}; both accept "auto", "none" and "required".
"""

from typing import Any

from moerun.harmony.render import tool_call_prefix
from moerun.harmony.structured import call_grammar
from moerun.server.errors import APIError
from moerun.server.protocol import NamedToolChoice

ToolChoice = str | NamedToolChoice | dict[str, Any] | None


def forced_call_prefix(tool_choice: ToolChoice, tool_names: list[str]) -> list[int]:
    """Tokens that start the assistant turn so that the model has to call: none for "auto" and
    "none"; a 400 for a choice the tools cannot meet."""
    if tool_choice in (None, "auto", "none"):
        return []
    if tool_choice == "required":
        if not tool_names:
            raise APIError(400, "tool_choice 'required' needs tools", param="tool_choice")
        return tool_call_prefix(None)
    name = chosen_name(tool_choice)
    if name not in tool_names:
        raise APIError(400, f"tool_choice names unknown function {name!r}", param="tool_choice")
    return tool_call_prefix(name)


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


def forced_call_grammar(tool_choice: ToolChoice, tools: list[dict]) -> str:
    """The grammar of what follows forced_call_prefix: a declared name (for "required") and
    arguments that are JSON, matching the parameters of a `"strict": true` tool. tools:
    {"name", "parameters", "strict"} each (both APIs' shapes flattened)."""
    schemas = {t["name"]: t.get("parameters") if t.get("strict") else None for t in tools}
    named = None if tool_choice == "required" else chosen_name(tool_choice)
    return call_grammar(schemas, named)
