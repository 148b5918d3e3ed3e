"""One choice of a text completion: engine deltas -> text, stop strings and legacy logprobs.

No harmony here: the text is the tokens decoded as they are (the stop token that ends the
generation left out, as `moerun generate` does). Logprobs come in the legacy shape: parallel
lists of token strings, their logprobs, top alternatives and character offsets into the text.
"""

import codecs
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from moerun.engine.sampler import TokenLogprobs
from moerun.harmony.tokenizer import load_tokenizer
from moerun.sampling import SamplingParams
from moerun.server.engine_client import EngineClient
from moerun.server.stop_strings import StopMatcher


@dataclass
class CompletionJob:
    request_id: str
    prompt: list[int]
    params: SamplingParams
    stops: list[str] = field(default_factory=list)
    echo: bool = False
    score_only: bool = False  # max_tokens 0: the engine makes one token, which is dropped
    cache_salt: str | None = None


@dataclass
class LegacyLogprobs:
    tokens: list[str] = field(default_factory=list)
    token_logprobs: list[float | None] = field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = field(default_factory=list)
    text_offset: list[int] = field(default_factory=list)

    def add(self, token: int, entry: TokenLogprobs | None, offset: int) -> None:
        """entry None: nothing predicts it (the first prompt token)."""
        self.tokens.append(token_text(token))
        self.token_logprobs.append(None if entry is None else entry.logprob)
        self.text_offset.append(offset)
        if entry is None:
            self.top_logprobs.append(None)
            return
        # the chosen token is always listed, so there may be n + 1 entries (as OpenAI does)
        top = {token_text(t): lp for t, lp in entry.top}
        top.setdefault(token_text(entry.token_id), entry.logprob)
        self.top_logprobs.append(top)

    def page(self, start: int, end: int | None = None) -> dict:
        """Entries [start:end], as the API returns them."""
        return {name: values[start:end] for name, values in vars(self).items()}


@dataclass
class TextChoice:
    text: str = ""
    logprobs: LegacyLogprobs | None = None
    completion_tokens: int = 0
    finish_reason: str | None = None


def token_text(token: int) -> str:
    return load_tokenizer().decode_single_token_bytes(token).decode("utf-8", errors="replace")


class _Decoder:
    """UTF-8 text of a token stream (a character split across tokens appears once complete),
    counting the characters so far: the next token's text_offset."""

    def __init__(self) -> None:
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.length = 0

    def __call__(self, raw: bytes, final: bool = False) -> str:
        text = self._utf8.decode(raw, final=final)
        self.length += len(text)
        return text


async def run_text(
    engine: EngineClient, job: CompletionJob, choice: TextChoice
) -> AsyncIterator[str]:
    """Text pieces as they are produced; `choice` holds the totals (and the logprobs so far)."""
    tok, decode, stop = load_tokenizer(), _Decoder(), StopMatcher(job.stops)
    lp = choice.logprobs
    stream = engine.generate(job.prompt, job.params, job.request_id, job.cache_salt)
    first, reason = True, None
    try:
        async for delta in stream:
            if first and job.echo:  # the first delta carries the prompt's logprobs
                yield _echo(job.prompt, delta.prompt_logprobs, decode, lp)
            first = False
            if job.score_only:
                reason = "length"
                break
            for i, token in enumerate(delta.token_ids):
                choice.completion_tokens += 1
                ends = delta.finish_reason == "stop" and i == len(delta.token_ids) - 1
                if lp is not None and delta.logprobs:
                    lp.add(token, delta.logprobs[i], decode.length)
                text = stop.feed(decode(b"" if ends else tok.decode_single_token_bytes(token)))
                if text:
                    yield text
                if stop.stopped:
                    reason = "stop"
                    break
            if stop.stopped:
                break
            reason = delta.finish_reason or reason
    finally:
        await stream.aclose()  # leaving early (stop string, client gone) aborts the request
    tail = stop.feed(decode(b"", final=True)) + stop.flush()
    if tail:
        yield tail
    choice.finish_reason = reason


def _echo(
    prompt: list[int],
    entries: list[TokenLogprobs | None] | None,
    decode: _Decoder,
    lp: LegacyLogprobs | None,
) -> str:
    tok, pieces = load_tokenizer(), []
    for i, token in enumerate(prompt):
        if lp is not None:
            lp.add(token, entries[i] if entries and i < len(entries) else None, decode.length)
        pieces.append(decode(tok.decode_single_token_bytes(token)))
    return "".join(pieces)
