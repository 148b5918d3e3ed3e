"""Test helpers for the HTTP server: a real uvicorn on 127.0.0.1 in a thread, and a scripted
token source behind the same EngineClient interface as the real engine (plumbing tests only,
never numerics)."""

import asyncio
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager

import torch
import uvicorn

from moerun.engine.llm_engine import RequestOutput
from moerun.engine.sampler import TokenLogprobs
from moerun.harmony.tokenizer import SPECIAL_TOKENS, load_tokenizer
from moerun.sampling import SamplingParams
from moerun.server.app import create_app
from moerun.server.engine_client import EngineStats
from moerun.server.state import ServerState


def harmony_tokens(*pieces: str | int) -> list[int]:
    """Text pieces (plain text) and special-token names or ids -> token ids."""
    tok = load_tokenizer()
    out: list[int] = []
    for piece in pieces:
        if isinstance(piece, int):
            out.append(piece)
        elif piece in SPECIAL_TOKENS:
            out.append(SPECIAL_TOKENS[piece])
        else:
            out += tok.encode_ordinary(piece)
    return out


class ScriptedEngine:
    """Plays back scripted completions, one token per delta; records the prompts it was given."""

    def __init__(self, scripts: list[list[int]], max_model_len: int = 4096,
                 delay: float = 0.0) -> None:  # fmt: skip
        self.scripts, self.max_model_len, self.delay = list(scripts), max_model_len, delay
        self.prompts: list[list[int]] = []
        self.aborted: list[str] = []
        self.active = 0
        self.running: set[str] = set()  # request ids being played back
        self.stopping: set[str] = set()  # abort_all: these end with finish_reason "abort"

    async def generate(
        self, prompt: list[int], params: SamplingParams, request_id: str,
        cache_salt: str | None = None,
    ) -> AsyncIterator[RequestOutput]:  # fmt: skip
        self.prompts.append(list(prompt))
        script = self.scripts.pop(0) if len(self.scripts) > 1 else self.scripts[0]
        self.active += 1
        self.running.add(request_id)
        finished = False
        constraint = params.constraint() if params.constraint else None
        try:
            for n, token in enumerate(script[: params.max_tokens], start=1):
                if self.delay:
                    await asyncio.sleep(self.delay)
                if request_id in self.stopping:
                    finished = True
                    yield RequestOutput(request_id, prompt, [], finish_reason="abort")
                    return
                if constraint is not None:  # as the engine's greedy path: the script's token
                    logits = torch.zeros(201088)  # unless the constraint rules it out
                    logits[token] = 1.0
                    constraint.mask(logits)
                    token = int(logits.argmax())
                    constraint.accept(token)
                reason = None
                if token in (200002, 200012):
                    reason = "stop"
                elif n == params.max_tokens:
                    reason = "length"
                out = RequestOutput(request_id, prompt, [token], finish_reason=reason)
                if params.logprobs is not None:  # plumbing only: which tokens get an entry
                    out.logprobs = [TokenLogprobs(token, -0.5, [])]
                finished = reason is not None
                yield out
                if finished:
                    return
            finished = True
            yield RequestOutput(request_id, prompt, [], finish_reason="stop")
        finally:
            self.active -= 1
            self.running.discard(request_id)
            if not finished:
                self.aborted.append(request_id)

    def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)

    def abort_all(self) -> None:
        self.stopping |= self.running

    def stats(self) -> EngineStats:
        return EngineStats(running=self.active)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running_server(state: ServerState) -> Iterator[str]:
    """Serve the app with real uvicorn on 127.0.0.1; yields the base URL (…/v1)."""
    port = _free_port()
    config = uvicorn.Config(create_app(state), host="127.0.0.1", port=port, log_level="warning")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
