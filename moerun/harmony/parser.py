"""Stream-parse what gpt-oss generates after `<|start|>assistant` into API events (spec §5).

Well-formed output is a series of messages
`<|channel|>CH[ to=RECIPIENT][ <|constrain|>json]<|message|>CONTENT<|end|>` joined by
`<|start|>assistant`, ending with `<|return|>` (answer done) or `<|call|>` (tool call done). Real
output breaks this now and then (PEERS.md §3.1-§3.2), so the parser is lenient: it never raises,
never lets control-token text or header words into text or tool names, and reads a header from
its text, so a special token and its spelling as plain text (`<`,`|`,`channel`,...) mean the same.

Rules for the ambiguous cases:
- The header ends at `<|message|>`. Without one, it ends before the first token that cannot
  continue it; header pieces are `assistant`, `analysis`, `commentary`, `final`, `to=NAME`,
  `json`/`code` after a recipient or `<|constrain|>`, and the word glued to a `<|start|>`,
  `<|channel|>` or `<|constrain|>` marker. Leading whitespace of content found this way is dropped.
- An unknown word glued to a marker (`<|channel|>foo`) is header only once something confirms it
  (another header piece, `<|message|>`, a terminator); otherwise it is the start of the content.
- The last channel and recipient named in a header win; a channel word right after `<|start|>` is
  the channel (the role was left out).
- A recipient (`functions.x`, `browser.search`, `python`, ...) makes the message a tool call,
  whatever its channel; `all` and role names as recipients mean no tool call. With no recipient:
  analysis -> reasoning, commentary -> user-visible preamble, final/unknown/missing -> the answer.
- `<|start|>` or `<|channel|>` inside content starts a new message (the model skipped `<|end|>`);
  a stray `<|message|>`/`<|constrain|>` in content, reserved ids, `<|endoftext|>` and
  `<|startoftext|>` are dropped. `<|return|>`/`<|call|>` end the output whatever the message;
  tokens after them are ignored.
- A terminator right after a header closes an empty message (a tool call with empty arguments);
  a header cut short (max_tokens, or the stream just stops) is dropped.
- A header naming another author (`<|start|>functions.x to=assistant...`, `<|start|>user`) means
  the model is writing a turn that is not its own, e.g. a made-up tool result: the output ends
  there, as if `<|call|>`/`<|return|>` had come, and that message is not shown. So does a call
  to a function the request did not declare, when the caller names the declared ones.
"""

import codecs
import re
import secrets
import string
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import NamedTuple

import tiktoken

from moerun.harmony.tokenizer import SPECIAL_TOKENS, load_tokenizer


@dataclass(frozen=True)
class ReasoningDelta:
    text: str  # analysis channel text


@dataclass(frozen=True)
class ContentDelta:
    text: str
    channel: str  # "final", or "commentary" for a user-visible preamble


@dataclass(frozen=True)
class ToolCallStart:
    index: int
    id: str
    name: str  # without the "functions." prefix


@dataclass(frozen=True)
class ToolCallDelta:
    index: int
    arguments: str  # argument text fragment


@dataclass(frozen=True)
class MessageEnd:
    channel: str | None
    recipient: str | None


@dataclass(frozen=True)
class Done:
    finish_reason: str  # "stop" | "length" | "tool_calls"


Event = ReasoningDelta | ContentDelta | ToolCallStart | ToolCallDelta | MessageEnd | Done

_END, _RETURN, _CALL = (SPECIAL_TOKENS[t] for t in ("<|end|>", "<|return|>", "<|call|>"))
_MARKERS = {
    SPECIAL_TOKENS[t]: t for t in ("<|start|>", "<|channel|>", "<|constrain|>", "<|message|>")
}
_MESSAGE, _CONSTRAIN = SPECIAL_TOKENS["<|message|>"], SPECIAL_TOKENS["<|constrain|>"]
_FIRST_SPECIAL = SPECIAL_TOKENS["<|startoftext|>"]  # ids below it are ordinary BPE tokens
_CHANNELS = ("analysis", "commentary", "final")
_KNOWN_SLOTS = ("", "assistant", *_CHANNELS, "json", "code")
# a header that ends in a proper prefix of one of these may still grow into a header piece
_PREFIXES = ("assistant", *_CHANNELS, "json", "code", "to=", *_MARKERS.values())
_NOT_TOOLS = {"all", "assistant", "user", "system", "developer"}
_MAX_HEADER = 256  # bytes; real headers are < 100, so past this the "header" is content
_NAME = r"[A-Za-z0-9_.\-]*"  # ASCII only: the header is latin-1 text, one char per byte
_PIECE = re.compile(
    r"[ \t\r\n]*(?:(?P<body><\|message\|>)"
    rf"|<\|(?P<mark>start|channel|constrain)\|>(?P<slot>assistant|analysis|commentary|final|{_NAME})"
    rf"|to=(?P<to>{_NAME})"
    r"|(?P<word>assistant|analysis|commentary|final|json|code))"
)


class _Header(NamedTuple):
    """What a header's text says, and how far it reads as a header."""

    role: str | None  # the word after <|start|>, when it is not a channel
    channel: str | None
    recipient: str | None
    end: int  # offset after the last whole header piece
    sure: bool  # the last piece is a header for certain (not an unconfirmed unknown word)
    open: bool  # the text after `end` may still become a header piece
    body: int | None  # offset of the content, once `<|message|>` was seen


def _scan(text: str) -> _Header:
    role = channel = recipient = None
    pos, sure, typed = 0, True, False  # typed: after a recipient or <|constrain|>, `json` is a type
    while m := _PIECE.match(text, pos):
        if m["body"]:
            return _Header(role, channel, recipient, m.end(), True, False, m.end())
        if m["word"] in ("json", "code") and not typed:
            break  # a bare `json` in a final answer's header is more likely its first word
        pos, sure = m.end(), True
        if m["to"]:
            recipient, typed = m["to"], True
        elif m["word"] in _CHANNELS:
            channel = m["word"]
        elif m["mark"]:
            slot, typed = m["slot"], typed or m["mark"] == "constrain"
            sure = slot in _KNOWN_SLOTS
            if slot in _CHANNELS or (m["mark"] == "channel" and slot):
                channel = slot
            elif m["mark"] == "start" and slot:
                role = slot
    rest = text[pos:].lstrip(" \t\r\n")
    viable = any(p.startswith(rest) for p in _PREFIXES)
    return _Header(role, channel, recipient, pos, sure, viable, None)


_ALNUM = string.ascii_letters + string.digits


def _random_call_id() -> str:
    return "call_" + "".join(secrets.choice(_ALNUM) for _ in range(24))


def _utf8() -> codecs.IncrementalDecoder:
    # holds back a character split across tokens instead of emitting half of it
    return codecs.getincrementaldecoder("utf-8")(errors="replace")


class HarmonyParser:
    """Token ids in, events out, for one completion; the module docstring lists the rules."""

    def __init__(
        self,
        tokenizer: tiktoken.Encoding | None = None,
        new_call_id: Callable[[], str] | None = None,
        functions: Collection[str] | None = None,
    ) -> None:
        """functions: the declared function names (None: any recipient is a call); a call to
        anything else ends the output unseen, like a made-up tool result, so a client is never
        handed a call it cannot answer or send back."""
        self._tokenizer = tokenizer or load_tokenizer()
        self._functions = None if functions is None else frozenset(functions)
        self._new_call_id = new_call_id or _random_call_id
        self._state = "head"  # head | body | between (after <|end|>) | done (turn over: ignore)
        self._head = ""  # header text so far, latin-1 decoded so offsets are byte offsets
        self._kept = 0  # length of the prefix of _head that is header for certain
        self._channel: str | None = None
        self._recipient: str | None = None
        self._decoder = _utf8()
        self._calls = 0
        self._finished = False

    def feed(self, token: int) -> list[Event]:
        if self._finished or self._state == "done":
            return []  # generation should have stopped at <|return|>/<|call|>
        if token in (_END, _RETURN, _CALL):
            return self._terminate(token)
        if token in _MARKERS:
            return self._marker(token)
        if 0 <= token < _FIRST_SPECIAL:
            return self._ordinary(self._tokenizer.decode_single_token_bytes(token))
        return []  # reserved ids, <|endoftext|>, <|startoftext|>, out of range: never text

    @property
    def body_kind(self) -> str | None:
        """What the current message's content is: "reasoning", "content", "tool" or None (in a
        header or between messages). Lets callers count reasoning tokens and pick logprobs."""
        if self._state != "body":
            return None
        if self._recipient is not None:
            return "tool"
        return "reasoning" if self._channel == "analysis" else "content"

    def finish(self, reason: str | None = None) -> list[Event]:
        """End of generation; `reason` is "length" when max_tokens cut it. Later calls: []."""
        if self._finished:
            return []
        self._finished = True
        stopped = self._state == "done"  # a stop token came, so max_tokens did not cut anything
        events = self._close() if self._state == "body" else []  # a cut-off header is dropped
        if reason == "length" and not stopped:
            return [*events, Done("length")]
        return [*events, Done("tool_calls" if self._calls else "stop")]

    def _terminate(self, token: int) -> list[Event]:
        events: list[Event] = []
        if self._state == "head":  # no <|message|>: the terminator closes the header as well
            events = self._open_body(_scan(self._head), "")
        if self._state == "body":
            events += self._close()
        if self._state != "done":
            self._state = "between" if token == _END else "done"
        return events

    def _marker(self, token: int) -> list[Event]:
        events: list[Event] = []
        if self._state == "body":
            if token in (_MESSAGE, _CONSTRAIN):
                return []  # stray marker inside content
            events = self._close()  # a new header without <|end|><|start|>
        if self._state == "between":
            self._begin()
        header = _scan(self._head)
        self._head = self._head[: header.end] + _MARKERS[token]  # drops a half-written word
        return events + self._advance()

    def _ordinary(self, data: bytes) -> list[Event]:
        if self._state == "body":
            return self._emit(self._decoder.decode(data))
        if self._state == "between":
            self._begin()  # text right after <|end|>: a header without <|start|>, or content
        self._head += data.decode("latin-1")
        return self._advance()

    def _begin(self) -> None:
        self._state, self._head, self._kept = "head", "", 0

    def _advance(self) -> list[Event]:
        """Re-read the header after it grew; open the body once it cannot be a header any more."""
        header = _scan(self._head)
        if header.body is not None:
            return self._open_body(header, self._head[header.body :])
        whole = header.end == len(self._head)
        if whole and header.sure:
            self._kept = len(self._head)
        if (whole or header.open) and len(self._head) <= _MAX_HEADER:
            return []  # may still be header: wait for the next token
        # content began without <|message|>: everything after the certain header is content
        rest = self._head[self._kept :].lstrip(" \t\r\n")
        return self._open_body(_scan(self._head[: self._kept]), rest)

    def _open_body(self, header: _Header, rest: str) -> list[Event]:
        if header.role not in (None, "assistant"):
            self._state = "done"  # the model writes another author's turn (a made-up tool result)
            return []
        self._state, self._channel, self._decoder = "body", header.channel, _utf8()
        self._recipient = None if header.recipient in _NOT_TOOLS else header.recipient
        if self._recipient is not None and not self._declared(self._recipient):
            self._state = "done"
            return []
        events: list[Event] = []
        if self._recipient is not None:
            name = self._recipient.removeprefix("functions.") or self._recipient
            events.append(ToolCallStart(self._calls, self._new_call_id(), name))
            self._calls += 1
        return events + self._emit(self._decoder.decode(rest.encode("latin-1")))

    def _declared(self, recipient: str) -> bool:
        if self._functions is None:
            return True
        return recipient.startswith("functions.") and recipient[10:] in self._functions

    def _emit(self, text: str) -> list[Event]:
        if not text:
            return []
        if self._recipient is not None:
            return [ToolCallDelta(self._calls - 1, text)]
        if self._channel == "analysis":
            return [ReasoningDelta(text)]
        if self._channel == "commentary":
            return [ContentDelta(text, "commentary")]
        return [ContentDelta(text, "final")]  # final, unknown or missing channel: the answer

    def _close(self) -> list[Event]:
        events = self._emit(self._decoder.decode(b"", final=True))
        self._state = "between"
        return [*events, MessageEnd(self._channel, self._recipient)]
