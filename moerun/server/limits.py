"""What one client may cost the server: request body size, and the HTTP-level limits of uvicorn.

The body limit is an ASGI middleware, so it covers every route: a Content-Length over the limit
is refused before a byte of the body is read; a chunked upload is counted as it arrives and
refused once it passes the limit. The HTTP limits are uvicorn's, set here on purpose rather than
left at its defaults; uvicorn has no timeout for a request head, so HeaderTimeoutH11 adds one.
"""

import asyncio
from dataclasses import dataclass

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

from moerun.server.body import BodyError
from moerun.server.errors import send_error


@dataclass(frozen=True)
class HTTPLimits:
    """uvicorn's connection limits (documented in README's Server section)."""

    keep_alive_s: int = 5  # an idle keep-alive connection is closed after this
    header_timeout_s: float = 10  # the whole request head must arrive within this
    max_connections: int = 1024  # uvicorn's limit_concurrency: past it, a plain-text 503
    backlog: int = 1024  # connections the kernel queues before accept()
    max_header_bytes: int = 64 * 2**10  # h11's max incomplete event size: a head past it is a 400


def too_large(limit: int) -> BodyError:
    return BodyError(413, f"request body is larger than {limit} bytes (serve "
                     "--max-request-bytes)", code="request_too_large")  # fmt: skip


class BodyLimit:
    """413 in OpenAI's shape for a body over `limit` bytes, without reading the rest of it."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = Headers(scope=scope).get("content-length", "")
        if length.isdigit() and int(length) > self.limit:
            error = too_large(self.limit)
            await send_error(send, 413, str(error.detail), "invalid_request_error",
                             code=error.code)  # fmt: skip
            return
        seen = 0

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:  # reaches the error handlers, as any HTTPException
                    raise too_large(self.limit)
            return message

        await self.app(scope, counted, send)


class HeaderTimeoutH11(H11Protocol):
    """uvicorn's h11 protocol, plus: a connection that has not sent a whole request head within
    `header_timeout` seconds of connecting, or of its last response, is closed. Without it one
    byte a minute holds a connection (and a file descriptor) forever."""

    def __init__(self, *args, header_timeout: float, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.header_timeout = header_timeout
        self._head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
        super().connection_lost(exc)

    def _arm(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
        waiting = self.cycle  # a new request head replaces the cycle
        if waiting is not None and not waiting.response_complete:
            return  # a pipelined request already started

        def expire() -> None:
            if self.cycle is waiting and not self.transport.is_closing():
                self.transport.close()

        self._head_timer = self.loop.call_later(self.header_timeout, expire)
