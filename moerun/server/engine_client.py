"""The narrow interface the server uses: submit a prompt, receive an async stream of deltas, abort.

`AsyncEngine` runs the real `LLMEngine` on one background thread: it alone touches the engine,
so requests from every HTTP connection batch together in the same steps (continuous batching),
never one generate() at a time behind a lock. Tests put a scripted token source behind the
same interface to exercise the HTTP plumbing.
"""

import asyncio
import queue
import threading
from collections.abc import AsyncIterator
from typing import Protocol

from moerun.engine.llm_engine import EngineStats, LLMEngine, RequestOutput
from moerun.sampling import SamplingParams


class EngineClient(Protocol):
    max_model_len: int

    def generate(
        self, prompt: list[int], params: SamplingParams, request_id: str,
        cache_salt: str | None = None,
    ) -> AsyncIterator[RequestOutput]: ...  # fmt: skip

    def abort(self, request_id: str) -> None: ...

    def abort_all(self) -> None: ...

    def stats(self) -> EngineStats: ...


class _Failed:
    def __init__(self, error: Exception) -> None:
        self.error = error


class AsyncEngine:
    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self.max_model_len = engine.max_model_len
        self._commands: queue.Queue = queue.Queue()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._stats = engine.stats()  # KV blocks are known before the first request
        self._thread = threading.Thread(target=self._loop, name="moerun-engine", daemon=True)
        self._thread.start()

    async def generate(
        self, prompt: list[int], params: SamplingParams, request_id: str,
        cache_salt: str | None = None,
    ) -> AsyncIterator[RequestOutput]:  # fmt: skip
        """Deltas of one request; raises ValueError for a prompt the engine refuses. Leaving
        the iteration early (client gone) aborts the request and frees its KV blocks."""
        out: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = (asyncio.get_running_loop(), out)
        self._commands.put(("add", request_id, prompt, params, cache_salt))
        finished = False
        try:
            while not finished:
                item = await out.get()
                if isinstance(item, _Failed):
                    raise item.error
                finished = item.finished
                yield item
        finally:
            self._streams.pop(request_id, None)
            if not finished:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        """A stream still being read ends with a last delta, finish_reason "abort"."""
        self._commands.put(("abort", request_id))

    def abort_all(self) -> None:
        """Abort every request someone is reading (shutdown past its deadline)."""
        for request_id in list(self._streams):
            self.abort(request_id)

    def stats(self) -> EngineStats:
        return self._stats

    # ---- engine thread ---------------------------------------------------------------------
    def _deliver(self, request_id: str, item: RequestOutput | _Failed) -> None:
        target = self._streams.get(request_id)
        if target is not None:
            loop, out = target
            loop.call_soon_threadsafe(out.put_nowait, item)

    def _apply(self, command: tuple) -> None:
        if command[0] == "abort":
            final = self.engine.abort(command[1])
            if final is not None:  # a client that left has no stream: nothing is delivered
                self._deliver(command[1], final)
            return
        _, request_id, prompt, params, cache_salt = command
        try:
            self.engine.add_request(prompt, params, request_id, cache_salt)
        except ValueError as e:
            self._deliver(request_id, _Failed(e))

    def _loop(self) -> None:
        while True:
            # block while idle; otherwise take what arrived and keep stepping
            if not self.engine.has_unfinished():
                self._apply(self._commands.get())
            while not self._commands.empty():
                self._apply(self._commands.get_nowait())
            try:
                deltas = self.engine.step()
            except Exception as e:  # an engine bug: fail the running requests, keep serving
                deltas = []
                for request_id in list(self.engine.requests):
                    self.engine.abort(request_id)
                    self._deliver(request_id, _Failed(RuntimeError(f"engine failure: {e!r}")))
            for delta in deltas:
                self._deliver(delta.request_id, delta)
            self._stats = self.engine.stats()  # a frozen snapshot the event loop may read
