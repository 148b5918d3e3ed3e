"""Structured outputs over a whole harmony assistant turn, with llguidance (issue 15).

The grammar starts where the prompt ends (`<|start|>assistant`): an optional analysis message of
free text, then `<|start|>assistant<|channel|>final<|message|>`, the answer (JSON matching the
schema, or any JSON object), then `<|return|>`. Harmony's control tokens are tokens in the
grammar (`<|end|>`), so free text can never produce one and the header can never be garbled.
llguidance was measured against xgrammar on this vocabulary (issue 15's note): it compiles in
~1-3 ms, masks in ~10 us (median), and refuses bad or unsatisfiable schemas in ~1 ms.
"""

import functools
import json

import llguidance as llg
import llguidance.tiktoken
import numpy as np
import torch

from moerun.harmony.tokenizer import VOCAB_SIZE, load_tokenizer

ENDOFTEXT = 199999  # llguidance's end token; the grammar names <|return|> itself
# user-facing errors must not echo a whole schema back
LIMITS = llg.LLParserLimits(verbose_errors=False)
# JSON whitespace: at most one space, so a model cannot loop on newlines or indentation
WHITESPACE = "[ ]?"


@functools.cache
def ll_tokenizer() -> llg.LLTokenizer:
    """Built once (~1.3 s) and shared: o200k_harmony with every special token a real token."""
    return llguidance.tiktoken.lltokenizer_from_encoding(
        load_tokenizer(), n_vocab=VOCAB_SIZE, eos_token=ENDOFTEXT
    )


def json_rule(schema: dict | None) -> str:
    """A Lark `%json` item for `schema` (None: any JSON object), with compact whitespace."""
    schema = {"type": "object"} if schema is None else dict(schema)
    schema.setdefault("x-guidance", {"whitespace_pattern": WHITESPACE})
    return f"%json {json.dumps(schema)}"


def turn_grammar(schema: dict | None) -> str:
    """Lark for the assistant turn; schema None: any JSON object."""
    return "\n".join([
        'start: <|channel|> (analysis <|end|> <|start|> "assistant" <|channel|>)? final',
        'analysis: "analysis" <|message|> ANALYSIS',
        "ANALYSIS: /(.|\\n)*/",
        'final: "final" <|message|> answer <|return|>',
        f"answer: {json_rule(schema)}",
    ])  # fmt: skip


def check_grammar(lark: str) -> None:
    """ValueError naming the problem when llguidance cannot compile it (or it is too big): the
    first line of its message, without the grammar's source it quotes after it."""
    error = llg.LLMatcher.validate_grammar(
        llg.LLMatcher.grammar_from_lark(lark), ll_tokenizer(), limits=LIMITS
    )
    if error:
        first = error.strip().splitlines()[0]
        raise ValueError(first.split(": ", 1)[1] if first.startswith("at ") else first)


class GrammarConstraint:
    """A TokenConstraint (moerun.sampling): tokens outside the grammar are masked out."""

    def __init__(self, lark: str) -> None:
        self.matcher = llg.LLMatcher(ll_tokenizer(), llg.LLMatcher.grammar_from_lark(lark),
                                     log_level=0, limits=LIMITS)  # fmt: skip
        if self.matcher.is_error():
            raise ValueError(self.matcher.get_error())

    def allowed(self) -> np.ndarray:
        """[VOCAB_SIZE] bool: the tokens the grammar allows next."""
        bits = np.frombuffer(self.matcher.compute_bitmask(), dtype=np.uint8)
        return np.unpackbits(bits, bitorder="little")[:VOCAB_SIZE].astype(bool)

    def mask(self, logits: torch.Tensor) -> None:
        if self.matcher.is_stopped() or self.matcher.is_error():
            return  # the turn is over (the engine stops at <|return|>) or a bug upstream
        allowed = torch.from_numpy(self.allowed())
        logits[: allowed.shape[0]].masked_fill_(~allowed.to(logits.device), -torch.inf)

    def accept(self, token: int) -> None:
        if not (self.matcher.is_stopped() or self.matcher.is_error()):
            self.matcher.consume_token(token)


class AllOf:
    """Several constraints at once: a token must pass every mask (a grammar and a budget)."""

    def __init__(self, *constraints) -> None:
        self.constraints = constraints

    def mask(self, logits: torch.Tensor) -> None:
        for c in self.constraints:
            c.mask(logits)

    def accept(self, token: int) -> None:
        for c in self.constraints:
            c.accept(token)


def call_grammar(tools: dict[str, dict | None], named: str | None) -> str:
    """Lark for the rest of a forced function call, after the server's prefix (render's
    tool_call_prefix): with `named`, its arguments then `<|call|>`; else ("required") one of the
    declared names, the rest of the header, its arguments, `<|call|>`. tools: name -> the
    arguments' schema (a strict tool's parameters), None for any JSON object."""
    if named is not None:
        return f"start: {json_rule(tools[named] or None)} <|call|>"
    # the header's rest as harmony writes it (` <|constrain|>json<|message|>`), the space and
    # the content type optional as the parser reads them
    header = '" "? (<|constrain|> "json")? <|message|>'
    rules = [f"call_{i}: {json.dumps(name)} {header} {json_rule(tools[name] or None)} <|call|>"
             for i, name in enumerate(tools)]  # fmt: skip
    return "\n".join(["start: " + " | ".join(f"call_{i}" for i in range(len(tools))), *rules])
