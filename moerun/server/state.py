"""ServerState: what every handler shares (engine, model name, API key, metrics, stored responses).

Its own module so that app.py, chat.py and responses.py each import it, never one another.
"""

import time
from dataclasses import dataclass, field

from moerun.harmony.render import RenderOptions
from moerun.server.bounded_store import BoundedStore
from moerun.server.engine_client import EngineClient
from moerun.server.errors import APIError
from moerun.server.metrics import Metrics
from moerun.server.options import MAX_REQUEST_BYTES


@dataclass
class Lifecycle:
    """Whether the server still admits requests (moerun.server.shutdown), and how many it is
    running."""

    draining: bool = False
    in_flight: int = 0


@dataclass
class ServerState:
    engine: EngineClient
    model_name: str
    api_key: str | None = None
    default_effort: str = "medium"
    metrics: Metrics = field(default_factory=Metrics)
    created: int = field(default_factory=lambda: int(time.time()))
    # response id -> StoredResponse, within a byte budget (serve --response-store-bytes)
    stored_responses: BoundedStore = field(default_factory=BoundedStore)
    max_reasoning_tokens: int | None = None  # a request's default (serve --max-reasoning-tokens)
    warned_tool_types: set[str] = field(default_factory=set)  # ignored tool types, logged once
    max_request_bytes: int = MAX_REQUEST_BYTES  # a larger body is a 413 (serve --max-request-bytes)
    metrics_no_auth: bool = False  # /metrics open without the API key (serve --metrics-no-auth)
    lifecycle: Lifecycle = field(default_factory=Lifecycle)  # draining, requests in flight

    def __post_init__(self) -> None:
        if self.api_key is not None and not self.api_key.strip():
            raise ValueError("the API key must not be empty (None serves without a key)")

    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.model_name:
            raise APIError(
                404,
                f"The model `{name}` does not exist; this server serves `{self.model_name}`",
                "not_found_error",
                "model",
                "model_not_found",
            )

    def render_options(self, effort: str | None, date: str | None = None) -> RenderOptions:
        """date: the conversation's start date where it is known (a stored response chain),
        else today."""
        return RenderOptions(reasoning_effort=effort or self.default_effort,
                             current_date=date or time.strftime("%Y-%m-%d"))  # fmt: skip
