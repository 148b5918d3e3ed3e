"""JSON request bodies, parsed strictly and off the event loop.

Python's json module accepts what JSON does not: NaN and Infinity (and 1e400, which becomes
inf), and strings with lone surrogates (`"\\ud800"`). Let through, they fail later: NaN is
echoed into SSE as invalid JSON, a surrogate turns into a codec message from the tokenizer.
Here they are a 400 naming the field, before any handler runs. Parsing and checking run on a
worker thread, so a large body never stalls the event loop (and /health with it).
"""

import asyncio
import json
import math
import re
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import Request, Response
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException as StarletteHTTPException

# deeper bodies are refused before pydantic or the prompt renderer recurse into them; a tool
# schema has MAX_SCHEMA_DEPTH levels of its own, under a few levels of request
MAX_BODY_DEPTH = 100
MAX_SCHEMA_DEPTH = 64  # JSON nesting levels of one schema (tools, response formats)
_SURROGATE = re.compile("[\ud800-\udfff]")  # a pair was joined by the parser: these are lone


class BodyError(StarletteHTTPException):
    """A 4xx about the request body, raised while FastAPI reads it: FastAPI re-raises Starlette
    HTTPExceptions from there as they are (anything else becomes a generic 400)."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str | None = None) -> None:  # fmt: skip
        super().__init__(status, message)
        self.param, self.code = param, code


def parse_body(raw: bytes) -> Any:
    """The JSON value of a request body, or BodyError naming the first problem."""
    try:
        value = json.loads(raw)
    except RecursionError:
        raise BodyError(400, f"request body is nested more than {MAX_BODY_DEPTH} levels deep",
                        code="body_too_deep") from None  # fmt: skip
    except json.JSONDecodeError:
        raise  # FastAPI reports it as invalid JSON
    except ValueError as e:  # not UTF-8; an integer of more than 4300 digits
        raise BodyError(400, f"request body is not valid JSON: {e}") from None
    _check(value)
    return value


def _check(value: Any) -> None:
    """Walks the whole value once, iteratively (depth is what is being bounded); scalars are
    checked in place, only containers go on the stack."""
    if problem := _problem(value):
        _fail((), problem)
    stack: list[tuple[dict | list, tuple, int]] = []
    if isinstance(value, dict | list):
        stack.append((value, (), 1))
    while stack:
        item, path, depth = stack.pop()
        if depth > MAX_BODY_DEPTH:
            raise BodyError(400, f"request body is nested more than {MAX_BODY_DEPTH} levels "
                            "deep", code="body_too_deep")  # fmt: skip
        pairs = item.items() if isinstance(item, dict) else enumerate(item)
        for key, child in pairs:
            if isinstance(child, dict | list):
                stack.append((child, (*path, key), depth + 1))
            elif problem := _problem(child):
                _fail((*path, key), problem)
            if isinstance(key, str) and not key.isascii() and _SURROGATE.search(key):
                _fail(path, "keys must be valid Unicode (one has a lone surrogate)")


def _problem(item: Any) -> str | None:
    if isinstance(item, str) and not item.isascii() and _SURROGATE.search(item):
        return "strings must be valid Unicode (this one has a lone surrogate)"
    if isinstance(item, float) and not math.isfinite(item):
        return "numbers must be finite (NaN and Infinity are not JSON)"
    return None


def _fail(path: tuple, problem: str) -> None:
    where = ".".join(str(p) for p in path)
    raise BodyError(400, f"{where or 'request body'}: {problem}", where or None)


def bounded_schema(schema: dict[str, Any] | None) -> dict[str, Any] | None:
    """A pydantic AfterValidator: a JSON schema nested more than MAX_SCHEMA_DEPTH levels is
    refused (the TypeScript rendering of tools and the grammar compiler recurse into it)."""
    stack = [(schema, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict | list):
            if depth > MAX_SCHEMA_DEPTH:
                raise ValueError(f"schema is nested more than {MAX_SCHEMA_DEPTH} levels deep")
            children = item.values() if isinstance(item, dict) else item
            stack += [(child, depth + 1) for child in children]
    return schema


class StrictJSONRequest(Request):
    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            self._json = await asyncio.to_thread(parse_body, await self.body())
        return self._json


class StrictJSONRoute(APIRoute):
    """Routes whose JSON bodies go through parse_body (FastAPI's custom-route pattern)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def strict(request: Request) -> Response:
            return await handler(StrictJSONRequest(request.scope, request.receive))

        return strict
