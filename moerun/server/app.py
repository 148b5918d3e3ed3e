"""The FastAPI app: routes and the API key check. Handlers live in chat.py and responses.py, the
shared state in state.py; the engine is reached only through the EngineClient interface."""

import hmac

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from moerun.harmony.render import render_prompt
from moerun.server.chat import chat_completions
from moerun.server.errors import install_error_handlers
from moerun.server.protocol import ChatCompletionRequest, ResponsesRequest, TokenizeRequest
from moerun.server.responses import create_response
from moerun.server.state import ServerState

OPEN_PATHS = {"/health", "/metrics", "/docs", "/openapi.json"}


def create_app(state: ServerState) -> FastAPI:
    app = FastAPI(title="moerun", docs_url="/docs")
    app.state.moerun = state
    install_error_handlers(app)

    @app.middleware("http")
    async def _auth(request: Request, call_next):
        if state.api_key and request.url.path not in OPEN_PATHS:
            given = request.headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {state.api_key}".encode()):
                return JSONResponse(
                    {
                        "error": {
                            "message": "Incorrect or missing API key",
                            "type": "invalid_request_error",
                            "param": None,
                            "code": "invalid_api_key",
                        }
                    },
                    status_code=401,
                )
        return await call_next(request)

    @app.get("/health")
    async def health() -> Response:
        return Response(status_code=200)

    @app.get("/v1/models")
    async def models() -> dict:
        card = {
            "id": state.model_name,
            "object": "model",
            "created": state.created,
            "owned_by": "moerun",
            "max_model_len": state.engine.max_model_len,
        }
        return {"object": "list", "data": [card]}

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(state.metrics.render(state.engine), media_type="text/plain; version=0.0.4")

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest) -> dict:
        state.check_model(body.model)
        tools = [t.model_dump(exclude_none=True) for t in body.tools or []]
        messages = [m.model_dump(exclude_none=True) for m in body.messages]
        tokens = render_prompt(messages, tools, state.render_options(body.reasoning_effort))
        return {"tokens": tokens, "count": len(tokens), "max_model_len": state.engine.max_model_len}

    @app.post("/v1/chat/completions")
    async def chat(body: ChatCompletionRequest, request: Request) -> Response:
        return await chat_completions(state, body, request)

    @app.post("/v1/responses")
    async def responses(body: ResponsesRequest, request: Request) -> Response:
        return await create_response(state, body, request)

    return app
