"""POST /v1/chat/completions: harmony prompt in, OpenAI chat objects or SSE chunks out."""

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from moerun.engine.sampler import TokenLogprobs
from moerun.harmony.accumulate import MessageAccumulator
from moerun.harmony.parser import (
    ContentDelta,
    Done,
    Event,
    ReasoningDelta,
    ToolCallDelta,
    ToolCallStart,
)
from moerun.harmony.render import ResponseFormat as HarmonyFormat
from moerun.harmony.render import render_prompt
from moerun.harmony.structured import TEXT
from moerun.harmony.tokenizer import load_tokenizer
from moerun.sampling import SamplingParams
from moerun.server.errors import SERVER_ERROR, APIError, error_body
from moerun.server.generation import (
    Choice,
    GenerationRequest,
    max_new_tokens,
    run_choice,
    unless_disconnected,
)
from moerun.server.metrics import DeltaClock
from moerun.server.protocol import ChatCompletionRequest, ResponseFormat
from moerun.server.state import ServerState
from moerun.server.tool_choice import turn_constraint

log = logging.getLogger("moerun.server")


def build_requests(state: ServerState, body: ChatCompletionRequest) -> list[GenerationRequest]:
    state.check_model(body.model)
    tools = [t.model_dump(exclude_none=True) for t in body.tools or []]
    rendered_tools = [] if body.tool_choice == "none" else tools
    messages = [m.model_dump(exclude_none=True) for m in body.messages]
    options = state.render_options(body.reasoning_effort)
    prompt = render_prompt(messages, rendered_tools, options, _shown_format(body.response_format))
    requested = body.max_completion_tokens or body.max_tokens
    max_tokens = max_new_tokens(state.engine.max_model_len, len(prompt), requested, "messages")
    top = (body.top_logprobs or 0) if body.logprobs else None
    constraint = _constraint(state, body, [t["function"] for t in rendered_tools])
    base = uuid.uuid4().hex
    names = frozenset(t["function"]["name"] for t in rendered_tools)
    out = []
    for i in range(body.n):
        seed = None if body.seed is None else body.seed + i  # n different samples, reproducibly
        params = SamplingParams.from_request(
            max_tokens,
            body.temperature,
            body.top_p,
            seed,
            top,
            constraint,
        )
        out.append(GenerationRequest(f"chatcmpl-{base}-{i}", prompt, params, body.stop,
                                     body.cache_salt, names))  # fmt: skip
    return out


def _shown_format(fmt: ResponseFormat | None) -> HarmonyFormat | None:
    """A json_schema response format, as the developer message shows it to the model."""
    if fmt is None or fmt.type != "json_schema" or fmt.json_schema is None:
        return None
    spec = fmt.json_schema
    return HarmonyFormat(spec.name, spec.json_schema or {}, spec.description)


def _constraint(state: ServerState, body: ChatCompletionRequest, tools: list[dict]):
    """The grammar over the turn (tools, tool_choice, response format) or the budget."""
    fmt = body.response_format
    if fmt is not None and fmt.type == "json_schema" and fmt.json_schema is None:
        raise APIError(400, "response_format of type json_schema needs a json_schema",
                       param="response_format")  # fmt: skip
    answer = TEXT
    if fmt is not None and fmt.type != "text":
        answer = fmt.json_schema.json_schema if fmt.json_schema else None
    return turn_constraint(state, body.tool_choice, tools, answer, body.max_reasoning_tokens)


def _delta(event: Event) -> dict | None:
    if isinstance(event, ReasoningDelta):
        return {"reasoning_content": event.text, "reasoning": event.text}
    if isinstance(event, ContentDelta):
        return {"content": event.text}
    if isinstance(event, ToolCallStart):
        call = {
            "index": event.index,
            "id": event.id,
            "type": "function",
            "function": {"name": event.name, "arguments": ""},
        }
        return {"tool_calls": [call]}
    if isinstance(event, ToolCallDelta):
        return {"tool_calls": [{"index": event.index, "function": {"arguments": event.arguments}}]}
    return None


def _logprobs(entries: list[TokenLogprobs]) -> dict:
    tok = load_tokenizer()

    def one(token: int, logprob: float) -> dict:
        raw = tok.decode_single_token_bytes(token)
        return {
            "token": raw.decode("utf-8", errors="replace"),
            "logprob": logprob,
            "bytes": list(raw),
        }

    return {
        "content": [
            {**one(e.token_id, e.logprob), "top_logprobs": [one(t, lp) for t, lp in e.top]}
            for e in entries
        ]
    }


def _usage(prompt_tokens: int, choices: list[Choice]) -> dict:
    completion = sum(c.completion_tokens for c in choices)
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion,
        "total_tokens": prompt_tokens + completion,
        "prompt_tokens_details": {"cached_tokens": choices[0].cached_tokens},
        "completion_tokens_details": {"reasoning_tokens": sum(c.reasoning_tokens for c in choices)},
    }


async def _merged(
    state: ServerState, reqs: list[GenerationRequest], choices: list[Choice]
) -> AsyncIterator[tuple[int, Event]]:
    """Events of all n choices as they come, tagged with the choice index."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int) -> None:
        try:
            async for event in run_choice(state.engine, reqs[i], choices[i]):
                await queue.put((i, event))
        except Exception as e:  # noqa: BLE001 - handed to the consumer, which re-raises
            await queue.put((i, e))

    tasks = [asyncio.create_task(pump(i)) for i in range(len(reqs))]
    done = 0
    try:
        while done < len(reqs):
            i, event = await queue.get()
            if isinstance(event, Exception):
                raise event
            done += isinstance(event, Done)
            yield i, event
    finally:
        for task in tasks:
            task.cancel()


async def chat_completions(
    state: ServerState, body: ChatCompletionRequest, request: Request
) -> Response:
    reqs = await asyncio.to_thread(build_requests, state, body)  # rendering: off the event loop
    choices = [Choice() for _ in reqs]
    meta = {
        "id": reqs[0].request_id.rsplit("-", 1)[0],
        "created": int(time.time()),
        "model": state.model_name,
    }
    state.metrics.prompt_tokens.inc(len(reqs[0].prompt))
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        sse = _stream(state, reqs, choices, meta, include_usage, body.logprobs)
        return StreamingResponse(sse, media_type="text/event-stream")
    messages = [MessageAccumulator() for _ in reqs]
    clock = DeltaClock(state.metrics)

    async def collect() -> None:
        async for i, event in _merged(state, reqs, choices):
            messages[i].feed(event)
            if _delta(event) is not None:
                clock.tick()

    try:
        if not await unless_disconnected(request, collect()):
            return Response(status_code=499)  # nobody is listening any more
    finally:  # finished, refused or abandoned: every choice counts once
        _count(state, choices)
    out = []
    for i, (acc, choice) in enumerate(zip(messages, choices, strict=True)):
        msg = acc.message()
        msg["reasoning"] = msg["reasoning_content"]  # clients read one name or the other
        lp = _logprobs(choice.logprobs) if body.logprobs else None
        out.append(
            {"index": i, "message": msg, "logprobs": lp, "finish_reason": choice.finish_reason}
        )
    return JSONResponse(
        {
            **meta,
            "object": "chat.completion",
            "choices": out,
            "usage": _usage(len(reqs[0].prompt), choices),
        }
    )


def _count(state: ServerState, choices: list[Choice]) -> None:
    """Without a finish reason a choice was aborted (client gone, prompt refused)."""
    for choice in choices:
        state.metrics.count_finished("chat", choice.completion_tokens, choice.finish_reason)


async def _stream(
    state: ServerState,
    reqs: list[GenerationRequest],
    choices: list[Choice],
    meta: dict,
    include_usage: bool,
    logprobs: bool,
) -> AsyncIterator[str]:
    def chunk(choice_list: list[dict], usage: dict | None = None) -> str:
        body = {**meta, "object": "chat.completion.chunk", "choices": choice_list}
        if include_usage:
            body["usage"] = usage
        return f"data: {json.dumps(body)}\n\n"

    for i in range(len(reqs)):
        role = {"role": "assistant", "content": ""}
        yield chunk([{"index": i, "delta": role, "logprobs": None, "finish_reason": None}])
    clock = DeltaClock(state.metrics)
    sent = [0] * len(reqs)  # logprobs already sent, per choice
    try:
        async for i, event in _merged(state, reqs, choices):
            if isinstance(event, Done):
                yield chunk(
                    [
                        {
                            "index": i,
                            "delta": {},
                            "logprobs": None,
                            "finish_reason": event.finish_reason,
                        }
                    ]
                )
                continue
            delta = _delta(event)
            if delta is None:
                continue
            clock.tick()
            lp = None
            if logprobs and "content" in delta:
                lp, sent[i] = _logprobs(choices[i].logprobs[sent[i] :]), len(choices[i].logprobs)
            yield chunk([{"index": i, "delta": delta, "logprobs": lp, "finish_reason": None}])
    except ValueError as e:  # the engine refused the prompt after the headers went out
        yield f"data: {json.dumps(error_body(str(e), 'invalid_request_error'))}\n\n"
    except Exception as e:  # a bug after the headers went out: an error event, not a cut stream
        log.error("chat completion stream failed", exc_info=e)
        yield f"data: {json.dumps(error_body(SERVER_ERROR, 'server_error'))}\n\n"
    finally:  # also when the client has gone (the generator is closed)
        _count(state, choices)
    if include_usage:
        yield chunk([], _usage(len(reqs[0].prompt), choices))
    yield "data: [DONE]\n\n"
