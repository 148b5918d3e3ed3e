"""ServerState: what every handler shares (engine, model name, API key, metrics, stored responses).

Its own module so that app.py, chat.py and responses.py each import it, never one another.
"""

import functools
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from moerun.harmony.budget import ReasoningBudget
from moerun.harmony.render import RenderOptions
from moerun.harmony.structured import AllOf, GrammarConstraint, check_grammar
from moerun.server.engine_client import EngineClient
from moerun.server.errors import APIError
from moerun.server.metrics import Metrics


@dataclass
class ServerState:
    engine: EngineClient
    model_name: str
    api_key: str | None = None
    default_effort: str = "medium"
    metrics: Metrics = field(default_factory=Metrics)
    created: int = field(default_factory=lambda: int(time.time()))
    stored_responses: dict = field(default_factory=dict)  # response id -> StoredResponse
    max_reasoning_tokens: int | None = None  # a request's default (serve --max-reasoning-tokens)

    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.model_name:
            raise APIError(
                404,
                f"The model `{name}` does not exist; this server serves `{self.model_name}`",
                "not_found_error",
                "model",
                "model_not_found",
            )

    def constraint(
        self, budget: int | None, lark: str | None = None, param: str = "response_format"
    ) -> Callable | None:
        """A request's SamplingParams.constraint: its reasoning budget (else serve's default)
        and a grammar (moerun.harmony.structured), compiled here so that one llguidance
        refuses is a 400 naming the problem, before anything is queued."""
        limit = self.max_reasoning_tokens if budget is None else budget
        if lark is not None:
            try:
                check_grammar(lark)
            except ValueError as e:
                raise APIError(400, f"invalid JSON schema: {e}", param=param) from None
        if lark is None:
            return None if limit is None else functools.partial(ReasoningBudget, limit)
        if limit is None:
            return functools.partial(GrammarConstraint, lark)
        return lambda: AllOf(GrammarConstraint(lark), ReasoningBudget(limit))

    def render_options(self, effort: str | None, date: str | None = None) -> RenderOptions:
        """date: the conversation's start date where it is known (a stored response chain),
        else today."""
        return RenderOptions(reasoning_effort=effort or self.default_effort,
                             current_date=date or time.strftime("%Y-%m-%d"))  # fmt: skip
