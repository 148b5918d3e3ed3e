"""POST /v1/responses: input items -> a harmony prompt; harmony events -> output items or SSE.

Finished responses are kept (when `store` is true) so that `previous_response_id` can continue
the conversation: the stored entry holds the whole item list (earlier turns, input, output).
"""

import asyncio
import itertools
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from moerun.harmony.render import ResponseFormat, render_prompt
from moerun.harmony.structured import TEXT
from moerun.sampling import SamplingParams
from moerun.server.errors import SERVER_ERROR, APIError
from moerun.server.generation import (
    Choice,
    GenerationRequest,
    max_new_tokens,
    run_choice,
    unless_disconnected,
)
from moerun.server.metrics import DeltaClock
from moerun.server.protocol import ResponsesRequest, ResponsesTool
from moerun.server.responses_input import input_items, to_messages
from moerun.server.responses_output import OutputBuilder
from moerun.server.responses_store import StoredResponse, store
from moerun.server.state import ServerState
from moerun.server.tool_choice import turn_constraint

log = logging.getLogger("moerun.server")


@dataclass
class Plan:
    """What one request resolved to: the generation, the conversation and the response fields
    known before generating."""

    req: GenerationRequest
    items: list[dict]
    instructions: str | None
    date: str
    shell: dict  # the response object while in progress (status, output, usage still open)
    ignored_tools: list[str]  # types of the request's tools this server does not run

    @property
    def input_tokens(self) -> int:
        return len(self.req.prompt)


async def create_response(state: ServerState, body: ResponsesRequest, request: Request) -> Response:
    plan = await asyncio.to_thread(_plan, state, body)  # rendering: off the event loop
    state.metrics.prompt_tokens.inc(plan.input_tokens)
    # clients may look for what was left out: hosted tools are accepted, never run
    headers = {"x-moerun-ignored-tools": ",".join(plan.ignored_tools)} if plan.ignored_tools else {}
    if body.stream:
        sse = _stream(state, plan)
        return StreamingResponse(sse, media_type="text/event-stream", headers=headers)
    builder, choice = OutputBuilder(), Choice()
    clock = DeltaClock(state.metrics)

    async def collect() -> None:
        async with aclosing(run_choice(state.engine, plan.req, choice)) as events:
            async for event in events:
                if any(out["type"].endswith(".delta") for out in builder.feed(event)):
                    clock.tick()

    try:
        if not await unless_disconnected(request, collect()):
            return Response(status_code=499)  # nobody is listening any more
    finally:
        state.metrics.count_finished("responses", choice.completion_tokens, choice.finish_reason)
    return JSONResponse(_finish(state, plan, builder, choice), headers=headers)


def _plan(state: ServerState, body: ResponsesRequest) -> Plan:
    state.check_model(body.model)
    history, instructions, date = _history(state, body)
    items = history + input_items(body.input)
    if not items:
        raise APIError(400, "input must not be empty", param="input")
    messages = to_messages(items, first_new=len(history))
    if instructions:
        messages.insert(0, {"role": "system", "content": instructions})
    functions = [t for t in body.tools or [] if isinstance(t, ResponsesTool)]
    tools = [t.model_dump(exclude_none=True) for t in functions]
    rendered_tools = [] if body.tool_choice == "none" else tools
    ignored = sorted({t.type for t in body.tools or [] if not isinstance(t, ResponsesTool)})
    _warn_ignored(state, ignored)
    effort = (body.reasoning.effort if body.reasoning else None) or state.default_effort
    options = state.render_options(effort, date)
    fmt = body.text.format if body.text else None
    if fmt is not None and fmt.type == "json_schema" and fmt.json_schema is None:
        raise APIError(400, "text.format of type json_schema needs a schema", param="text.format")
    shown = None
    if fmt is not None and fmt.type == "json_schema" and fmt.json_schema is not None:
        shown = ResponseFormat(fmt.name, fmt.json_schema, fmt.description)
    prompt = render_prompt(messages, rendered_tools, options, shown)
    max_tokens = max_new_tokens(state.engine.max_model_len, len(prompt), body.max_output_tokens,
                                "input")  # fmt: skip
    answer = TEXT if fmt is None or fmt.type == "text" else fmt.json_schema
    constraint = turn_constraint(state, body.tool_choice, rendered_tools, answer,
                                 body.max_reasoning_tokens, "text.format")  # fmt: skip
    params = SamplingParams.from_request(max_tokens, body.temperature, body.top_p, body.seed,
                                         constraint=constraint)  # fmt: skip
    names = frozenset(t["name"] for t in rendered_tools)
    req = GenerationRequest(f"resp_{uuid.uuid4().hex}", prompt, params,
                            cache_salt=body.cache_salt, functions=names)  # fmt: skip
    shell = _shell(state, body, req, instructions, effort)
    return Plan(req, items, instructions, options.current_date, shell, ignored)


def _warn_ignored(state: ServerState, kinds: list[str]) -> None:
    """One log line per tool type, the first time a request sends it."""
    for kind in kinds:
        if kind not in state.warned_tool_types:
            state.warned_tool_types.add(kind)
            log.warning("responses: ignoring tools of type %r (only function tools run)", kind)


def _shell(
    state: ServerState,
    body: ResponsesRequest,
    req: GenerationRequest,
    instructions: str | None,
    effort: str,
) -> dict:
    """The response object before generation: the request's settings, no output yet."""
    parallel = True if body.parallel_tool_calls is None else body.parallel_tool_calls
    return {
        "id": req.request_id,
        "object": "response",
        "created_at": int(time.time()),
        "status": "in_progress",
        "incomplete_details": None,
        "model": state.model_name,
        "output": [],
        "usage": None,
        "instructions": instructions,
        "tools": [t.model_dump() for t in body.tools or []],
        "tool_choice": body.tool_choice or "auto",
        "temperature": req.params.temperature,
        "top_p": req.params.top_p,
        "max_output_tokens": body.max_output_tokens,
        "previous_response_id": body.previous_response_id,
        "reasoning": {"effort": effort, "summary": None},
        "parallel_tool_calls": parallel,
        "store": body.store,
        "text": {"format": {"type": "text"}},
        "error": None,
        "metadata": body.metadata or {},
    }


def _history(
    state: ServerState, body: ResponsesRequest
) -> tuple[list[dict], str | None, str | None]:
    """The stored conversation `previous_response_id` names, the instructions to use (the
    request's own, else the stored ones, as OpenAI's gpt-oss reference server does), and the
    conversation's date."""
    if body.previous_response_id is None:
        return [], body.instructions, None
    stored = state.stored_responses.get(body.previous_response_id)
    if not isinstance(stored, StoredResponse):
        raise APIError(
            404,
            f"Previous response with id '{body.previous_response_id}' not found.",
            "invalid_request_error",
            "previous_response_id",
            "previous_response_not_found",
        )
    instructions = body.instructions if body.instructions is not None else stored.instructions
    return list(stored.items), instructions, stored.date


def _finish(state: ServerState, plan: Plan, builder: OutputBuilder, choice: Choice) -> dict:
    """The finished response object; stored when the request asked for it."""
    # abort: the server shut down past its deadline (shutdown.py)
    why = {"length": "max_output_tokens", "abort": "server_shutdown"}.get(builder.finish_reason)
    cut = why is not None
    used = plan.input_tokens
    result = {
        **plan.shell,
        "status": "incomplete" if cut else "completed",
        "incomplete_details": {"reason": why} if cut else None,
        "output": builder.items,
        "usage": {
            "input_tokens": used,
            "input_tokens_details": {"cached_tokens": choice.cached_tokens},
            "output_tokens": choice.completion_tokens,
            "output_tokens_details": {"reasoning_tokens": choice.reasoning_tokens},
            "total_tokens": used + choice.completion_tokens,
        },
    }
    if plan.shell["store"]:
        store(state.stored_responses, result, plan.items, plan.instructions, plan.date)
    return result


async def _stream(state: ServerState, plan: Plan) -> AsyncIterator[str]:
    """SSE events. Cancellation (client gone) is never caught here: it closes run_choice, which
    closes the engine stream, which aborts the request."""
    numbers = itertools.count()

    def sse(event: dict) -> str:
        event = {"type": event["type"], "sequence_number": next(numbers), **event}
        return f"event: {event['type']}\ndata: {json.dumps(event)}\n\n"

    yield sse({"type": "response.created", "response": plan.shell})
    yield sse({"type": "response.in_progress", "response": plan.shell})
    builder, choice = OutputBuilder(), Choice()
    clock = DeltaClock(state.metrics)
    try:
        async with aclosing(run_choice(state.engine, plan.req, choice)) as events:
            async for event in events:
                for out in builder.feed(event):
                    if out["type"].endswith(".delta"):
                        clock.tick()
                    yield sse(out)
    except Exception as e:  # the engine refused the prompt after the headers went out, or a bug
        error = {"code": "invalid_prompt", "message": str(e)}
        if not isinstance(e, ValueError):
            log.error("response stream failed", exc_info=e)
            error = {"code": "server_error", "message": SERVER_ERROR}
        failed = {**plan.shell, "status": "failed", "error": error}
        yield sse({"type": "response.failed", "response": failed})
        return
    finally:
        state.metrics.count_finished("responses", choice.completion_tokens, choice.finish_reason)
    result = _finish(state, plan, builder, choice)
    kind = "response.completed" if result["status"] == "completed" else "response.incomplete"
    yield sse({"type": kind, "response": result})
