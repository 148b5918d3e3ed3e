"""The FastAPI app: routes and the API key check. Handlers live in chat.py, completions.py,
responses.py and responses_store.py, the shared state in state.py; the engine is reached only
through the EngineClient interface."""

import asyncio
from typing import Literal

from fastapi import FastAPI, Query, Request
from fastapi.responses import JSONResponse, Response

from moerun.harmony.render import render_prompt
from moerun.server import responses_store as stored
from moerun.server.auth import authorized, needs_key
from moerun.server.body import StrictJSONRoute
from moerun.server.chat import chat_completions
from moerun.server.completions import completions
from moerun.server.errors import error_body, install_error_handlers
from moerun.server.limits import BodyLimit
from moerun.server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    ResponsesRequest,
    TokenizeRequest,
)
from moerun.server.responses import create_response
from moerun.server.shutdown import Admission
from moerun.server.state import ServerState


def create_app(state: ServerState) -> FastAPI:
    app = FastAPI(title="moerun", docs_url="/docs")
    app.router.route_class = StrictJSONRoute  # JSON bodies: strict, parsed off the event loop
    app.state.moerun = state
    install_error_handlers(app)
    # inside the key check (added before it): its receive would wrap the 413 in an ExceptionGroup
    app.add_middleware(BodyLimit, limit=state.max_request_bytes)

    @app.middleware("http")
    async def _auth(request: Request, call_next):
        given = request.headers.get("authorization", "")
        key_ok = not state.api_key or authorized(given, state.api_key)
        if not key_ok and needs_key(request.url.path, state.metrics_no_auth):
            message = "Incorrect or missing API key"
            body = error_body(message, "invalid_request_error", code="invalid_api_key")
            return JSONResponse(body, status_code=401)
        return await call_next(request)

    app.add_middleware(Admission, lifecycle=state.lifecycle)  # the outermost (added last)

    # HEAD for load balancers; kept out of the schema, where it would repeat GET's operation id
    @app.head("/health", include_in_schema=False)
    @app.get("/health")
    async def health() -> Response:
        return Response(status_code=200)

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [_model_card(state)]}

    @app.get("/v1/models/{model_id:path}")  # a Hugging Face id has a slash
    async def model(model_id: str) -> dict:
        state.check_model(model_id)
        return _model_card(state)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(state.metrics.render(state.engine), media_type="text/plain; version=0.0.4")

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest) -> dict:
        state.check_model(body.model)
        tools = [t.model_dump(exclude_none=True) for t in body.tools or []]
        messages = [m.model_dump(exclude_none=True) for m in body.messages]
        options = state.render_options(body.reasoning_effort)
        tokens = await asyncio.to_thread(render_prompt, messages, tools, options)  # off the loop
        return {"tokens": tokens, "count": len(tokens), "max_model_len": state.engine.max_model_len}

    @app.post("/v1/chat/completions")
    async def chat(body: ChatCompletionRequest, request: Request) -> Response:
        return await chat_completions(state, body, request)

    @app.post("/v1/responses")
    async def responses(body: ResponsesRequest, request: Request) -> Response:
        return await create_response(state, body, request)

    @app.get("/v1/responses/{response_id}")
    async def get_response(response_id: str) -> dict:
        return stored.lookup(state.stored_responses, response_id).response

    @app.get("/v1/responses/{response_id}/input_items")
    async def input_items(response_id: str, after: str | None = None, before: str | None = None,
                          limit: int = Query(20, ge=1, le=100),
                          order: Literal["asc", "desc"] = "desc") -> dict:  # fmt: skip
        entry = stored.lookup(state.stored_responses, response_id)
        return stored.input_items(entry, after, before, limit, order)

    @app.delete("/v1/responses/{response_id}")
    async def delete_response(response_id: str) -> dict:
        return stored.delete(state.stored_responses, response_id)

    @app.post("/v1/completions")
    async def text_completions(body: CompletionRequest, request: Request) -> Response:
        return await completions(state, body, request)

    return app


def _model_card(state: ServerState) -> dict:
    return {
        "id": state.model_name,
        "object": "model",
        "created": state.created,
        "owned_by": "moerun",
        "max_model_len": state.engine.max_model_len,
    }
