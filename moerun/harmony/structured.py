"""Structured outputs over a whole harmony assistant turn, with llguidance (issue 15).

The grammar starts where the prompt ends (`<|start|>assistant`): an optional analysis message of
free text, then `<|start|>assistant<|channel|>final<|message|>`, the answer (JSON matching the
schema, or any JSON object), then `<|return|>`. Harmony's control tokens are tokens in the
grammar (`<|end|>`), so free text can never produce one and the header can never be garbled.
llguidance was measured against xgrammar on this vocabulary (bench/grammar_backends.py, numbers
in bench/README): it compiles in ~3 ms where xgrammar's eager compile takes ~1 s (21 s worst),
and it never loosens a schema; a schema it cannot enforce is refused with a reason.
"""

import functools
import json
import threading
from collections.abc import Mapping

import llguidance as llg
import llguidance.tiktoken
import numpy as np
import torch

from moerun.harmony.tokenizer import VOCAB_SIZE, load_tokenizer
from moerun.sampling import StructuredOutput

ENDOFTEXT = 199999  # llguidance's end token; the grammar names <|return|> itself
# user-facing errors must not echo a whole schema back
LIMITS = llg.LLParserLimits(verbose_errors=False)
# JSON whitespace: at most one space, so a model cannot loop on newlines or indentation
WHITESPACE = "[ ]?"
COMPILE_SECONDS = 5.0  # a schema that takes longer to compile is refused (a 400)


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


def output_grammar(spec: StructuredOutput) -> str:
    """Lark for a raw completion (no harmony turn): the schema, regex or grammar; llguidance
    then allows only the end token (<|endoftext|>, a stop id) once it is complete."""
    if spec.grammar is not None:
        return spec.grammar
    if spec.regex is not None:
        return "start: /" + spec.regex.replace("/", "\\/") + "/"
    schema = json.loads(spec.json) if isinstance(spec.json, str) else spec.json
    return f"start: {json_rule(None if schema is True else schema)}"


TEXT = "text"  # turn_grammar's answer: free text (no response format)


def turn_grammar(
    answer: dict | str | None = TEXT,
    tools: Mapping[str, dict | None] | None = None,
    final: bool = True,
    max_reasoning: int | None = None,
) -> str:
    """Lark for the assistant turn, from where the prompt ends (`<|start|>assistant`): one
    optional analysis message (at most `max_reasoning` tokens, after which the grammar forces
    `<|end|>`), then a final message (when `final`) or a call to one of `tools`.

    answer: TEXT, a JSON schema, or None (any JSON object). tools: name -> the arguments' schema
    (a strict tool's parameters), None for any JSON object. A call is written either way the
    model writes it: `<|channel|>commentary to=functions.NAME` or `to=functions.NAME<|channel|>
    commentary`, then ` <|constrain|>json`, ` json` or nothing, then `<|message|>`."""
    tools = tools or {}
    assert final or tools, "a turn needs a final message or a call"
    budget = "" if max_reasoning is None else f"[max_tokens={max_reasoning}]"
    lasts = ["final"] if final else []
    lasts += [f"call_{i}" for i in range(len(tools))]
    body = "TEXT" if answer == TEXT else json_rule(answer)
    rules = [
        f'start: (analysis <|end|> <|start|> "assistant")? ({" | ".join(lasts)})',
        'analysis: <|channel|> "analysis" <|message|> reasoning',
        f"reasoning{budget}: TEXT",
        "TEXT: /(.|\\n)*/",
        f'final: <|channel|> "final" <|message|> {body} <|return|>',
        'ctype: (" "? <|constrain|> "json" | " json")?',
    ]
    for i, (name, schema) in enumerate(tools.items()):
        to = json.dumps(f" to=functions.{name}")
        header = f'(<|channel|> "commentary" {to} | {to} <|channel|> "commentary")'
        rules.append(f"call_{i}: {header} ctype <|message|> {json_rule(schema)} <|call|>")
    return "\n".join(rules)


def _first_line(error: str) -> str:
    """llguidance's first line, without the grammar's source it quotes after it."""
    first = error.strip().splitlines()[0]
    return first.split(": ", 1)[1] if first.startswith("at ") else first


@functools.lru_cache(maxsize=256)
def _compiled(lark: str) -> llg.LLMatcher:
    """A fresh matcher for `lark`: compiled once per grammar, copied for each request."""
    matcher = llg.LLMatcher(ll_tokenizer(), llg.LLMatcher.grammar_from_lark(lark),
                            log_level=0, limits=LIMITS)  # fmt: skip
    if matcher.is_error():
        raise ValueError(_first_line(matcher.get_error()))
    return matcher


def check_grammar(lark: str, timeout: float = COMPILE_SECONDS) -> None:
    """ValueError naming the problem when llguidance cannot compile `lark` (or it is too big),
    or when compiling takes longer than `timeout` seconds: a pathological schema must not stall
    the server. The compile runs on its own thread so that the wait can give up; its result
    lands in the cache either way."""
    ll_tokenizer()  # built once (~1.3 s), not part of any schema's time
    outcome: list = []

    def run() -> None:
        try:
            outcome.append(_compiled(lark))
        except ValueError as e:
            outcome.append(e)

    thread = threading.Thread(target=run, daemon=True, name="grammar-compile")
    thread.start()
    thread.join(timeout)
    if not outcome:
        raise ValueError(f"the grammar took longer than {timeout:g} s to compile")
    if isinstance(outcome[0], ValueError):
        raise outcome[0]


class GrammarConstraint:
    """A TokenConstraint (moerun.sampling): tokens outside the grammar are masked out."""

    def __init__(self, lark: str) -> None:
        self.matcher = _compiled(lark).deep_copy()
        self.bits = np.empty((VOCAB_SIZE + 31) // 32, dtype=np.int32)  # llguidance's bitmask

    def allowed(self) -> np.ndarray:
        """[VOCAB_SIZE] bool: the tokens the grammar allows next."""
        self.matcher.unsafe_compute_mask_ptr(self.bits.ctypes.data, self.bits.nbytes)
        return np.unpackbits(self.bits.view(np.uint8), bitorder="little")[:VOCAB_SIZE].view(bool)

    def mask(self, logits: torch.Tensor) -> None:
        """Touches only the smaller side: whole-vocabulary boolean ops in torch cost
        milliseconds on a busy CPU, index ops over a few thousand ids ~50 us."""
        if self.matcher.is_error():
            return  # a bug upstream: never leave a request with no token at all
        # once complete (stopped), the mask holds only the end token, <|endoftext|>
        allowed = self.allowed()[: logits.shape[0]]
        if 2 * np.count_nonzero(allowed) < allowed.shape[0]:  # JSON: a few tokens fit
            keep = torch.from_numpy(np.flatnonzero(allowed)).to(logits.device)
            kept = logits[keep]
            logits.fill_(-torch.inf)
            logits[keep] = kept
        else:  # free text: all but the control tokens
            drop = torch.from_numpy(np.flatnonzero(~allowed)).to(logits.device)
            logits.index_fill_(0, drop, -torch.inf)

    def accept(self, token: int) -> None:
        if not (self.matcher.is_stopped() or self.matcher.is_error()):
            self.matcher.consume_token(token)
