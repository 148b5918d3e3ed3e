"""SamplingParams: how one request picks its tokens, frozen and validated on construction."""

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    import torch

GREEDY_BELOW = 1e-5  # temperatures under this sample greedily (as vLLM does)
MAX_LOGPROBS = 20  # the OpenAI API's cap on top_logprobs
SEED_RANGE = range(-(2**63), 2**64)  # what torch.Generator.manual_seed accepts


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)  # True is an int to Python, not to us


def _is_real(x: object) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool)


def _require(ok: bool, name: str, value: object, rule: str) -> None:
    if not ok:
        raise ValueError(f"{name} must be {rule}, got {value!r}")


class TokenConstraint(Protocol):
    """One request's rule over its next token, advanced as tokens are accepted: a reasoning
    budget (moerun.harmony.budget), a grammar. The engine knows nothing else of it."""

    def mask(self, logits: "torch.Tensor") -> None:
        """logits [V] of the next token, fp32: set -inf, in place, where a token is not allowed
        (all but one: that token is forced)."""

    def accept(self, token: int) -> None:
        """The request's next token is `token`."""


@dataclass(frozen=True)
class StructuredOutput:
    """What a raw completion (LLM.generate / stream) must match, exactly one of: a JSON schema
    (a dict, or its JSON text; True: any JSON object), a regular expression, or a Lark grammar
    in llguidance's dialect. moerun.llm turns it into a grammar constraint; the server's
    response_format does the same over a whole harmony turn."""

    json: dict | str | bool | None = None
    regex: str | None = None
    grammar: str | None = None

    def __post_init__(self) -> None:
        given = [x for x in (self.json, self.regex, self.grammar) if x not in (None, False)]
        _require(len(given) == 1, "structured_output", self, "exactly one of json, regex, grammar")


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1 = disabled; -1 is stored as 0
    min_p: float = 0.0
    max_tokens: int = 16
    stop_token_ids: tuple[int, ...] = ()  # a list is accepted and stored as a tuple
    ignore_eos: bool = False
    seed: int | None = None
    logprobs: int | None = None  # top-n per generated token; 0 = only the chosen token's
    prompt_logprobs: int | None = None  # the same, per prompt position
    # makes each request's TokenConstraint (its own state), once, when the request is added
    constraint: Callable[[], TokenConstraint] | None = None
    structured_output: StructuredOutput | None = None  # LLM turns it into a constraint

    def __post_init__(self) -> None:
        t, p, k, m = self.temperature, self.top_p, self.top_k, self.min_p
        mt, stop, seed = self.max_tokens, self.stop_token_ids, self.seed
        _require(_is_real(t) and math.isfinite(t) and t >= 0, "temperature", t, "finite and >= 0")
        _require(_is_real(p) and 0 < p <= 1, "top_p", p, "in (0, 1]")
        _require(_is_int(k) and k >= -1, "top_k", k, "-1 (disabled) or an int >= 0")
        _require(_is_real(m) and 0 <= m <= 1, "min_p", m, "in [0, 1]")
        _require(_is_int(mt) and mt >= 1, "max_tokens", mt, "an int >= 1")
        _require(isinstance(self.ignore_eos, bool), "ignore_eos", self.ignore_eos, "a bool")
        seed_ok = seed is None or (_is_int(seed) and seed in SEED_RANGE)
        _require(seed_ok, "seed", seed, "None or an int in [-2**63, 2**64)")
        for name in ("logprobs", "prompt_logprobs"):
            n = getattr(self, name)
            ok = n is None or (_is_int(n) and 0 <= n <= MAX_LOGPROBS)
            _require(ok, name, n, f"None or an int in [0, {MAX_LOGPROBS}]")
        c = self.constraint
        _require(c is None or callable(c), "constraint", c, "None or a callable")
        so = self.structured_output
        _require(so is None or isinstance(so, StructuredOutput), "structured_output", so,
                 "None or a StructuredOutput")  # fmt: skip
        _require(so is None or c is None, "constraint", c, "None with a structured_output")
        ok = isinstance(stop, list | tuple) and all(_is_int(i) and i >= 0 for i in stop)
        _require(ok, "stop_token_ids", stop, "a list or tuple of ints >= 0")
        # frozen: normalize through object.__setattr__, once, here
        object.__setattr__(self, "stop_token_ids", tuple(stop))
        object.__setattr__(self, "top_k", max(k, 0))
        for name in ("temperature", "top_p", "min_p"):
            object.__setattr__(self, name, float(getattr(self, name)))

    @classmethod
    def from_request(
        cls,
        max_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        logprobs: int | None = None,
        constraint: Callable[[], TokenConstraint] | None = None,
    ) -> "SamplingParams":
        """The fields an API request or `moerun chat` may leave out, None meaning "not given".
        The defaults above fill the gaps, so chat completions, responses and the terminal chat
        cannot drift apart on them."""
        given = {
            "max_tokens": max_tokens,
            "temperature": temperature,
            "top_p": top_p,
            "seed": seed,
            "logprobs": logprobs,
            "constraint": constraint,
        }
        return cls(**{name: value for name, value in given.items() if value is not None})

    @property
    def greedy(self) -> bool:
        # below this, dividing fp32 logits by the temperature overflows (1e-50 is 0 in fp32:
        # 0/0 = nan, which sampled the last id every time); the distribution is argmax anyway
        return self.temperature < GREEDY_BELOW
