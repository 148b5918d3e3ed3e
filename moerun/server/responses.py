"""POST /v1/responses (filled in below)."""

from fastapi import Request
from fastapi.responses import Response

from moerun.server.app import ServerState
from moerun.server.errors import APIError
from moerun.server.protocol import ResponsesRequest


async def create_response(state: ServerState, body: ResponsesRequest, request: Request) -> Response:
    raise APIError(501, "the Responses API is not implemented yet", "server_error")
