"""POST /v1/completions: the legacy text completions API, raw prompts without the chat format.

Prompts are text (special tokens such as <|start|> read as such, so a hand-written harmony
prompt works) or token ids. `echo` with `logprobs` returns the prompt's own logprobs (the first
token's is null): lm-evaluation-harness scores continuations that way, with `max_tokens` 0 to
generate nothing.
"""

import asyncio
import dataclasses
import json
import time
import uuid
from collections.abc import AsyncIterator

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from moerun.harmony.tokenizer import load_tokenizer
from moerun.sampling import SamplingParams
from moerun.server.errors import APIError, error_body
from moerun.server.generation import max_new_tokens, unless_disconnected
from moerun.server.metrics import DeltaClock
from moerun.server.protocol import CompletionRequest
from moerun.server.state import ServerState
from moerun.server.text_completion import CompletionJob, LegacyLogprobs, TextChoice, run_text


def _prompts(prompt: str | list) -> list[list[int]]:
    """Token ids of each prompt the request holds."""
    texts = [prompt] if isinstance(prompt, str) else prompt
    if texts and isinstance(texts[0], int):
        texts = [texts]  # one prompt as token ids
    if not texts or any(not p for p in texts):
        raise APIError(400, "prompt must not be empty", param="prompt")
    tok = load_tokenizer()
    return [p if isinstance(p, list) else tok.encode(p, allowed_special="all") for p in texts]


def build_jobs(state: ServerState, body: CompletionRequest) -> list[CompletionJob]:
    """n jobs per prompt, in the order of the choices' indices."""
    state.check_model(body.model)
    score_only = body.max_tokens == 0
    if score_only and not body.echo:
        raise APIError(400, "max_tokens 0 needs echo (there is nothing to return)",
                       param="max_tokens")  # fmt: skip
    prompt_logprobs = body.logprobs if body.echo else None
    base, jobs = uuid.uuid4().hex, []
    for p, prompt in enumerate(_prompts(body.prompt)):
        limit = state.engine.max_model_len
        # scoring alone makes one token (the engine always samples one), then drops it
        requested = 1 if score_only else body.max_tokens
        max_tokens = max_new_tokens(limit, len(prompt), requested, "prompt")
        for i in range(body.n):
            seed = None if body.seed is None else body.seed + i  # n different samples
            params = SamplingParams.from_request(max_tokens, body.temperature, body.top_p, seed,
                                                 body.logprobs)  # fmt: skip
            params = dataclasses.replace(params, prompt_logprobs=prompt_logprobs)
            jobs.append(CompletionJob(f"cmpl-{base}-{p * body.n + i}", prompt, params, body.stop,
                                      body.echo, score_only, body.cache_salt))  # fmt: skip
    return jobs


def _usage(jobs: list[CompletionJob], choices: list[TextChoice], n: int) -> dict:
    prompt = sum(len(job.prompt) for job in jobs[::n])  # each prompt once, however many choices
    completion = sum(c.completion_tokens for c in choices)
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion}  # fmt: skip


async def _merged(
    state: ServerState, jobs: list[CompletionJob], choices: list[TextChoice]
) -> AsyncIterator[tuple[int, str | None]]:
    """(choice index, text piece) as they come; (index, None) once a choice is over."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int) -> None:
        try:
            async for text in run_text(state.engine, jobs[i], choices[i]):
                await queue.put((i, text))
            await queue.put((i, None))
        except Exception as e:  # noqa: BLE001 - handed to the consumer, which re-raises
            await queue.put((i, e))

    tasks = [asyncio.create_task(pump(i)) for i in range(len(jobs))]
    done = 0
    try:
        while done < len(jobs):
            i, item = await queue.get()
            if isinstance(item, Exception):
                raise item
            done += item is None
            yield i, item
    finally:
        for task in tasks:
            task.cancel()


async def completions(state: ServerState, body: CompletionRequest, request: Request) -> Response:
    jobs = await asyncio.to_thread(build_jobs, state, body)  # tokenizing: off the event loop
    choices = [TextChoice(logprobs=None if body.logprobs is None else LegacyLogprobs())
               for _ in jobs]  # fmt: skip
    meta = {"id": jobs[0].request_id.rsplit("-", 1)[0], "object": "text_completion",
            "created": int(time.time()), "model": state.model_name}  # fmt: skip
    state.metrics.prompt_tokens.inc(sum(len(job.prompt) for job in jobs[:: body.n]))
    if body.stream:
        usage = bool(body.stream_options and body.stream_options.include_usage)
        sse = _stream(state, jobs, choices, meta, usage, body.n)
        return StreamingResponse(sse, media_type="text/event-stream")
    clock = DeltaClock(state.metrics)

    async def collect() -> None:
        async for i, text in _merged(state, jobs, choices):
            if text:
                choices[i].text += text
                clock.tick()

    try:
        if not await unless_disconnected(request, collect()):
            return Response(status_code=499)  # nobody is listening any more
    finally:
        for c in choices:
            state.metrics.count_finished("completions", c.completion_tokens, c.finish_reason)
    out = [_choice(i, c, c.text) for i, c in enumerate(choices)]
    return JSONResponse({**meta, "choices": out, "usage": _usage(jobs, choices, body.n)})


def _choice(i: int, c: TextChoice, text: str, start: int = 0, end: int | None = None) -> dict:
    lp = None if c.logprobs is None else c.logprobs.page(start, end)
    return {"index": i, "text": text, "logprobs": lp, "finish_reason": c.finish_reason}


async def _stream(
    state: ServerState,
    jobs: list[CompletionJob],
    choices: list[TextChoice],
    meta: dict,
    include_usage: bool,
    n: int,
) -> AsyncIterator[str]:
    def chunk(choice_list: list[dict], usage: dict | None = None) -> str:
        body = {**meta, "choices": choice_list}
        if include_usage:
            body["usage"] = usage
        return f"data: {json.dumps(body)}\n\n"

    clock = DeltaClock(state.metrics)
    sent = [0] * len(jobs)  # logprob entries already sent, per choice
    try:
        async for i, text in _merged(state, jobs, choices):
            c = choices[i]
            if text is None:  # the choice is over: its finish reason (and logprobs not yet sent)
                yield chunk([_choice(i, c, "", sent[i])])
                continue
            clock.tick()
            end = len(c.logprobs.tokens) if c.logprobs is not None else 0
            yield chunk([{**_choice(i, c, text, sent[i], end), "finish_reason": None}])
            sent[i] = end
    except ValueError as e:  # the engine refused the prompt after the headers went out
        yield f"data: {json.dumps(error_body(str(e), 'invalid_request_error'))}\n\n"
    finally:
        for c in choices:
            state.metrics.count_finished("completions", c.completion_tokens, c.finish_reason)
    if include_usage:
        yield chunk([], _usage(jobs, choices, n))
    yield "data: [DONE]\n\n"
