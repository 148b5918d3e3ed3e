"""Graceful shutdown with a deadline.

The first SIGTERM or SIGINT starts a drain: new requests get a 503 (the socket stays open, so a
client hears why), running ones go on until `serve --shutdown-timeout` seconds have passed. Past
the deadline the engine aborts what is left: every stream ends with a last event (finish_reason
"abort", then `data: [DONE]`; Responses: `response.incomplete`), then the process exits. A
second signal exits at once. uvicorn alone would wait for open streams forever (its graceful
timeout defaults to none), and past a timeout it cancels them, cutting streams mid-event.
"""

import os
import sys
import time
from functools import partial
from types import FrameType

import uvicorn
from starlette.types import ASGIApp, Receive, Scope, Send

from moerun.server.errors import send_error
from moerun.server.limits import HeaderTimeoutH11, HTTPLimits
from moerun.server.options import SHUTDOWN_TIMEOUT_S
from moerun.server.state import Lifecycle, ServerState

# after the abort, how long streams get to write their last events before uvicorn cancels them
ABORT_GRACE_S = 1.0


class Admission:
    """ASGI middleware: counts requests in flight; while draining, refuses new ones (503)."""

    def __init__(self, app: ASGIApp, lifecycle: Lifecycle) -> None:
        self.app, self.lifecycle = app, lifecycle

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self.lifecycle.draining:
            await send_error(send, 503, "the server is shutting down", "server_error",
                             code="server_shutting_down")  # fmt: skip
            return
        self.lifecycle.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.lifecycle.in_flight -= 1


class GracefulServer(uvicorn.Server):
    """uvicorn.Server whose signals start a drain (above) instead of uvicorn's own shutdown."""

    def __init__(self, config: uvicorn.Config, state: ServerState, shutdown_timeout: float
                 ) -> None:  # fmt: skip
        super().__init__(config)
        self.state, self.shutdown_timeout = state, shutdown_timeout
        self.deadline: float | None = None  # time.monotonic() when the drain ends
        self.aborted = False

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.deadline is not None:
            print("moerun: second signal, exiting now", file=sys.stderr, flush=True)
            os._exit(128 + sig)  # as a process killed by that signal: no cleanup, no waiting
        self.deadline = time.monotonic() + self.shutdown_timeout
        self.state.lifecycle.draining = True
        running = self.state.lifecycle.in_flight
        print(f"moerun: shutting down; {running} request(s) running get up to "
              f"{self.shutdown_timeout:g}s to finish", file=sys.stderr, flush=True)  # fmt: skip

    async def on_tick(self, counter: int) -> bool:
        """uvicorn's main loop asks this every 0.1 s whether to shut down."""
        if self.deadline is not None and self._drained(time.monotonic()):
            return True
        return await super().on_tick(counter)

    def _drained(self, now: float) -> bool:
        if self.state.lifecycle.in_flight == 0:
            return True
        if now < self.deadline:
            return False
        if not self.aborted:
            self.aborted = True
            self.state.engine.abort_all()
        return now >= self.deadline + ABORT_GRACE_S


def build_server(
    app: ASGIApp,
    state: ServerState,
    host: str,
    port: int,
    shutdown_timeout: float = SHUTDOWN_TIMEOUT_S,
    limits: HTTPLimits | None = None,
) -> GracefulServer:
    """The server `serve` runs, with uvicorn's limits set deliberately (limits.HTTPLimits)."""
    limits = limits or HTTPLimits()
    config = uvicorn.Config(
        app, host=host, port=port, log_level="warning",
        http=partial(HeaderTimeoutH11, header_timeout=limits.header_timeout_s),
        timeout_keep_alive=limits.keep_alive_s, limit_concurrency=limits.max_connections,
        backlog=limits.backlog, h11_max_incomplete_event_size=limits.max_header_bytes,
        timeout_graceful_shutdown=int(ABORT_GRACE_S),
    )  # fmt: skip
    return GracefulServer(config, state, shutdown_timeout)
