"""One choice's generation: engine deltas -> harmony events -> what the API layers need.

Shared by Chat Completions and Responses: it owns the parser, the stop strings, token counts
(completion, reasoning) and the logprobs of answer tokens. Model output never raises here: the
parser is lenient, so a malformed completion still ends with a finish reason, never a 500.
"""

import asyncio
from collections.abc import AsyncIterator, Coroutine
from dataclasses import dataclass, field

from fastapi import Request

from moerun.engine.sampler import TokenLogprobs
from moerun.harmony.parser import ContentDelta, Done, Event, HarmonyParser
from moerun.harmony.tokenizer import SPECIAL_TOKENS, load_tokenizer
from moerun.sampling import SamplingParams
from moerun.server.engine_client import EngineClient
from moerun.server.errors import APIError
from moerun.server.stop_strings import StopMatcher


@dataclass
class GenerationRequest:
    request_id: str
    prompt: list[int]
    params: SamplingParams
    stops: list[str] = field(default_factory=list)
    cache_salt: str | None = None
    functions: frozenset[str] | None = None  # declared function names; None: any name


@dataclass
class Choice:
    """Accumulated result of one choice."""

    completion_tokens: int = 0
    reasoning_tokens: int = 0
    logprobs: list[TokenLogprobs] = field(default_factory=list)  # answer tokens only
    finish_reason: str | None = None
    cached_tokens: int = 0  # prompt tokens served from the prefix cache


async def run_choice(
    engine: EngineClient, req: GenerationRequest, choice: Choice
) -> AsyncIterator[Event]:
    """Harmony events of one generation, ending with exactly one Done."""
    parser = HarmonyParser(load_tokenizer(), functions=req.functions)
    stop = StopMatcher(req.stops)
    stream = engine.generate(req.prompt, req.params, req.request_id, req.cache_salt)
    reason = None
    try:
        async for delta in stream:
            choice.cached_tokens = delta.num_cached_tokens
            for i, token in enumerate(delta.token_ids):
                choice.completion_tokens += 1
                before = parser.body_kind
                events = parser.feed(token)
                if parser.body_kind == "reasoning":
                    choice.reasoning_tokens += 1
                if delta.logprobs and _in_content(token, before, parser.body_kind, events):
                    choice.logprobs.append(delta.logprobs[i])
                for event in _apply_stops(events, stop):
                    yield event
                if stop.stopped:
                    reason = "stop"
                    break
            if stop.stopped:
                break
            reason = delta.finish_reason or reason
    finally:
        await stream.aclose()  # leaving early (stop string, client gone) aborts the request
    tail = stop.flush()
    if tail:
        yield ContentDelta(tail, "final")
    for event in parser.finish("length" if reason == "length" else None):
        if isinstance(event, Done):
            choice.finish_reason = "stop" if stop.stopped else event.finish_reason
            if reason == "abort":  # the engine gave up on it (shutdown past its deadline)
                choice.finish_reason = "abort"
            event = Done(choice.finish_reason)
        yield event


def _in_content(token: int, before: str | None, after: str | None, events: list[Event]) -> bool:
    """Whether a token belongs in the answer's logprobs: it wrote answer text, or it is text
    inside the answer that has not come out yet (half a UTF-8 character). Never a marker
    (<|message|> opens the body: it was not inside it), a reserved id or header text that the
    answer drops."""
    if any(isinstance(e, ContentDelta) for e in events):
        return True
    return before == after == "content" and token < SPECIAL_TOKENS["<|startoftext|>"]


def _apply_stops(events: list[Event], stop: StopMatcher) -> list[Event]:
    """Answer text passes through the stop-string matcher; everything else as is."""
    out: list[Event] = []
    for event in events:
        if isinstance(event, ContentDelta):
            text = stop.feed(event.text)
            if text:
                out.append(ContentDelta(text, event.channel))
        else:
            out.append(event)
    return out


async def unless_disconnected(request: Request, work: Coroutine) -> bool:
    """Run `work` to the end (True), or stop once the client has gone (False); a prompt the
    engine refuses (ValueError) is a 400. Cancelling the work closes the engine streams, which
    aborts the requests and frees their KV blocks."""

    async def gone() -> None:  # the body is read: the next message is http.disconnect
        while (await request.receive())["type"] != "http.disconnect":
            pass

    task, watch = asyncio.ensure_future(work), asyncio.ensure_future(gone())
    try:
        await asyncio.wait([task, watch], return_when=asyncio.FIRST_COMPLETED)
        if not task.done() and watch.exception() is None:
            return False
        try:
            await task  # re-raises what the work raised
        except ValueError as e:  # the engine refused the prompt
            raise APIError(400, str(e)) from None
        return True
    finally:
        task.cancel()
        watch.cancel()


def max_new_tokens(limit: int, used: int, requested: int | None, param: str) -> int:
    """The generation budget: what was asked for, else the rest of the context. A prompt that
    leaves no room, or a request past the context, is a 400 `context_length_exceeded`."""
    max_tokens = requested or max(limit - used, 0)
    if used + max_tokens > limit or used >= limit:
        raise APIError(
            400,
            f"This model's maximum context length is {limit} tokens; the prompt "
            f"has {used} and {max_tokens} more were requested",
            param=param,
            code="context_length_exceeded",
        )
    return max_tokens
