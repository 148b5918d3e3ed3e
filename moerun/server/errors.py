"""OpenAI-shaped errors: {"error": {"message", "type", "param", "code"}} with the right status."""

import json
import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import Send

from moerun.errors import MoerunError

log = logging.getLogger("moerun.server")
SERVER_ERROR = "The server had an error while processing your request"  # OpenAI's words


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = (
            status,
            message,
            type,
            param,
            code,
        )


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def _json(status: int, message: str, type: str, param=None, code=None) -> JSONResponse:
    return JSONResponse(error_body(message, type, param, code), status_code=status)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(_: Request, e: APIError) -> JSONResponse:
        return _json(e.status, e.message, e.type, e.param, e.code)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, e: RequestValidationError) -> JSONResponse:
        first = e.errors()[0] if e.errors() else {}
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        where = ".".join(loc)
        if first.get("type") == "json_invalid":
            return _json(400, "request body is not valid JSON", "invalid_request_error")
        message = f"{where}: {first.get('msg', 'invalid value')}" if where else first.get("msg", "")
        return _json(400, message, "invalid_request_error", where or None)

    @app.exception_handler(MoerunError)
    async def _moerun(_: Request, e: MoerunError) -> JSONResponse:
        return _json(400, str(e), "invalid_request_error")

    @app.exception_handler(ValueError)
    async def _value(_: Request, e: ValueError) -> JSONResponse:
        return _json(400, str(e), "invalid_request_error")

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, e: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        # body.BodyError carries param and code
        param, code = getattr(e, "param", None), getattr(e, "code", None)
        return _json(e.status_code, str(e.detail), kind, param, code)

    @app.exception_handler(Exception)  # a bug: logged, and still an answer in OpenAI's shape
    async def _bug(request: Request, e: Exception) -> JSONResponse:
        log.error("%s %s failed", request.method, request.url.path, exc_info=e)
        return _json(500, SERVER_ERROR, "server_error")


async def send_error(send: Send, status: int, message: str, type: str,
                     param: str | None = None, code: str | None = None) -> None:  # fmt: skip
    """An error response from ASGI middleware, where no exception handler runs; the connection
    closes after it (a request body may still be on its way)."""
    body = json.dumps(error_body(message, type, param, code)).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body)),
               (b"connection", b"close")]  # fmt: skip
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
