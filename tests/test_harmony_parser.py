"""HarmonyParser on token lists: well-formed outputs, the malformed outputs seen in the wild
(PEERS.md §3.1-§3.2), a cross-check against openai-harmony, and seeded random sweeps."""

import itertools
import random
import re
from types import ModuleType

import pytest

from moerun.harmony.parser import (
    ContentDelta,
    Done,
    Event,
    HarmonyParser,
    MessageEnd,
    ReasoningDelta,
    ToolCallDelta,
    ToolCallStart,
)
from moerun.harmony.tokenizer import SPECIAL_TOKENS, VOCAB_SIZE, load_tokenizer

TOK = load_tokenizer()
START, END, MESSAGE, CHANNEL, CONSTRAIN, RETURN, CALL = (
    SPECIAL_TOKENS[f"<|{t}|>"] for t in ("start", "end", "message", "channel", "constrain",
                                          "return", "call")
)  # fmt: skip
CONTROL = [START, END, MESSAGE, CHANNEL, CONSTRAIN, RETURN, CALL]
IGNORED = [199998, 199999, 200000, 200001, 200004, 200009, 200010, 200011, 200013, 200018, 201087]
OUT_OF_RANGE = [VOCAB_SIZE, 10**7, -1]
NAME_RE = re.compile(r"^[A-Za-z0-9_.\-]+$")
# spec §5.9 example A, the model's answer to "What is 2 + 2?"
SPEC_A = [200005, 35644, 200008, 1844, 31064, 25, 392, 4827, 382, 220, 17, 659, 220, 17, 16842,
          12295, 81645, 13, 51441, 6052, 13, 200007, 200006, 173781, 200005, 17196, 200008, 17,
          659, 220, 17, 314, 220, 19, 13, 200002]  # fmt: skip
SPEC_A_EVENTS = [
    ReasoningDelta('User asks: "What is 2 + 2?" Simple arithmetic. Provide answer.'),
    MessageEnd("analysis", None),
    ContentDelta("2 + 2 = 4.", "final"),
    MessageEnd("final", None),
    Done("stop"),
]


def toks(*parts: str | int) -> list[int]:
    """Text pieces encoded as plain text (each on its own), ints kept as (special) ids."""
    out: list[int] = []
    for part in parts:
        out += [part] if isinstance(part, int) else TOK.encode_ordinary(part)
    return out


def parse(tokens: list[int], reason: str | None = None) -> list[Event]:
    counter = itertools.count()
    parser = HarmonyParser(TOK, new_call_id=lambda: f"call_{next(counter)}")
    events = [event for token in tokens for event in parser.feed(token)]
    return events + parser.finish(reason)


def merged(events: list[Event]) -> list[Event]:
    """Consecutive deltas of one kind (and channel / call) joined, for exact comparison."""
    out: list[Event] = []
    for e in events:
        last = out[-1] if out else None
        if isinstance(e, ReasoningDelta) and isinstance(last, ReasoningDelta):
            out[-1] = ReasoningDelta(last.text + e.text)
        elif isinstance(e, ContentDelta) and isinstance(last, ContentDelta):
            assert last.channel == e.channel
            out[-1] = ContentDelta(last.text + e.text, e.channel)
        elif isinstance(e, ToolCallDelta) and isinstance(last, ToolCallDelta):
            assert last.index == e.index
            out[-1] = ToolCallDelta(e.index, last.arguments + e.arguments)
        else:
            out.append(e)
    return out


def messages(events: list[Event]) -> list[tuple[str | None, str | None, str]]:
    """(channel, recipient, text) per message, as the parser reported them."""
    out, text = [], ""
    for e in events:
        if isinstance(e, MessageEnd):
            out.append((e.channel, e.recipient, text))
            text = ""
        elif isinstance(e, ReasoningDelta | ContentDelta):
            text += e.text
        elif isinstance(e, ToolCallDelta):
            text += e.arguments
    return out


THINK = toks(CHANNEL, "analysis", MESSAGE, "Need weather.", END)
THOUGHT = [ReasoningDelta("Need weather."), MessageEnd("analysis", None)]
ARGS = '{"location": "Tokyo"}'


def call_events(index: int, name: str, args: str = ARGS, recipient: str | None = None) -> list:
    channel = "analysis" if recipient in ("browser.search", "python") else "commentary"
    return [
        ToolCallStart(index, f"call_{index}", name),
        ToolCallDelta(index, args),
        MessageEnd(channel, recipient or f"functions.{name}"),
    ]


# --- well-formed -------------------------------------------------------------------------------


def test_spec_example_analysis_then_final() -> None:
    assert merged(parse(SPEC_A)) == SPEC_A_EVENTS


def test_final_answer_streams_token_by_token() -> None:
    parser = HarmonyParser(TOK)
    for token in SPEC_A[:-9]:
        parser.feed(token)
    answer = ""
    answer_tokens = SPEC_A[-9:-1]
    for i, token in enumerate(answer_tokens):  # "2 + 2 = 4.": each token shows up at once
        (event,) = parser.feed(token)
        answer += event.text
        assert event == ContentDelta(event.text, "final")
        assert answer == TOK.decode(answer_tokens[: i + 1])
    assert answer == "2 + 2 = 4."
    assert parser.feed(RETURN) == [MessageEnd("final", None)]
    assert parser.finish() == [Done("stop")]


def test_tool_call_after_analysis_model_order() -> None:
    header = toks(START, "assistant", CHANNEL, "commentary to=functions.get_weather ", CONSTRAIN)
    tokens = THINK + header + toks("json", MESSAGE, ARGS, CALL)
    assert merged(parse(tokens)) == THOUGHT + call_events(0, "get_weather") + [Done("tool_calls")]


@pytest.mark.parametrize("recipient", ["functions.get_stock", "browser.search", "python",
                                       "functions."])  # fmt: skip
def test_a_call_to_an_undeclared_function_ends_the_output_unseen(recipient: str) -> None:
    header = toks(START, "assistant", CHANNEL, f"commentary to={recipient} ", CONSTRAIN)
    tokens = THINK + header + toks("json", MESSAGE, ARGS, CALL)
    parser = HarmonyParser(TOK, new_call_id=lambda: "call_0", functions=["get_weather"])
    events = [event for token in tokens for event in parser.feed(token)] + parser.finish()
    assert merged(events) == THOUGHT + [Done("stop")]
    declared = THINK + toks(START, "assistant", CHANNEL, "commentary to=functions.get_weather ",
                            CONSTRAIN, "json", MESSAGE, ARGS, CALL)  # fmt: skip
    parser = HarmonyParser(TOK, new_call_id=lambda: "call_0", functions=["get_weather"])
    events = [event for token in declared for event in parser.feed(token)] + parser.finish()
    assert merged(events) == THOUGHT + call_events(0, "get_weather") + [Done("tool_calls")]


def test_two_tool_calls_in_a_row_get_distinct_ids() -> None:
    call = toks(CHANNEL, "commentary to=functions.get_weather ", CONSTRAIN, "json", MESSAGE, ARGS)
    tokens = THINK + [START] + toks("assistant") + call + [END, START] + toks("assistant") + call
    events = merged(parse(tokens + [CALL]))
    assert events == THOUGHT + call_events(0, "get_weather") + call_events(1, "get_weather") + [
        Done("tool_calls")
    ]
    parser = HarmonyParser(TOK)  # the default ids: "call_" + 24 alphanumerics, all different
    starts = [e for t in tokens for e in parser.feed(t) if isinstance(e, ToolCallStart)]
    assert [s.index for s in starts] == [0, 1] and starts[0].id != starts[1].id
    assert all(re.fullmatch(r"call_[A-Za-z0-9]{24}", s.id) for s in starts)


def test_preamble_then_tool_call() -> None:
    tokens = THINK + toks(START, "assistant", CHANNEL, "commentary", MESSAGE, "Checking.", END)
    tokens += toks(START, "assistant", CHANNEL, "commentary to=functions.get_weather json")
    tokens += toks(MESSAGE, ARGS, CALL)
    preamble = [ContentDelta("Checking.", "commentary"), MessageEnd("commentary", None)]
    assert merged(parse(tokens)) == THOUGHT + preamble + call_events(0, "get_weather") + [
        Done("tool_calls")
    ]


@pytest.mark.parametrize(
    "recipient, header",
    [("browser.search", " to=browser.search code"), ("python", " to=python code")],
)
def test_builtin_tool_on_analysis_channel(recipient: str, header: str) -> None:
    tokens = THINK + toks(START, "assistant", CHANNEL, "analysis", header, MESSAGE, ARGS, CALL)
    assert merged(parse(tokens)) == THOUGHT + call_events(0, recipient, recipient=recipient) + [
        Done("tool_calls")
    ]


def test_length_cut_inside_content_keeps_the_partial_message() -> None:
    tokens = toks(CHANNEL, "final", MESSAGE, "The answer is")
    assert merged(parse(tokens, "length")) == [
        ContentDelta("The answer is", "final"),
        MessageEnd("final", None),
        Done("length"),
    ]
    assert parse(SPEC_A, "length")[-1] == Done("stop")  # it did stop: <|return|> came


def test_finish_is_idempotent_and_feed_after_it_is_ignored() -> None:
    parser = HarmonyParser(TOK)
    for token in toks(CHANNEL, "final", MESSAGE, "Hi"):
        parser.feed(token)
    assert parser.finish() == [MessageEnd("final", None), Done("stop")]
    assert parser.finish() == [] and parser.finish("length") == []
    assert parser.feed(TOK.encode_ordinary("more")[0]) == []


# --- malformed outputs seen in the wild --------------------------------------------------------


@pytest.mark.parametrize(
    "header",
    [
        [START, *toks("assistant to=functions.get_weather"), CHANNEL, *toks("commentary json")],
        [START, *toks("assistant to=functions.get_weather"), CHANNEL, *toks("commentary ")]
        + [CONSTRAIN, *toks("json")],
        [START, *toks("assistant"), CHANNEL, *toks("commentary to=functions.get_weather")],
        [START, *toks("assistant to=functions.get_weather")],  # no channel at all
    ],
)
def test_1_recipient_before_or_after_channel(header: list[int]) -> None:
    tokens = THINK + header + toks(MESSAGE, ARGS, CALL)
    events = merged(parse(tokens))
    assert events[:4] == THOUGHT + call_events(0, "get_weather")[:2]
    assert events[4].recipient == "functions.get_weather" and events[5:] == [Done("tool_calls")]


def test_1_recipient_first_in_the_first_message() -> None:
    tokens = toks(" to=functions.get_weather", CHANNEL, "commentary json", MESSAGE, ARGS, CALL)
    assert merged(parse(tokens)) == call_events(0, "get_weather") + [Done("tool_calls")]


@pytest.mark.parametrize(
    "tokens, expected",
    [
        (toks(CHANNEL, "final", "The answer is 4.", RETURN), "The answer is 4."),
        (toks(CHANNEL, "final", " The answer is 4.", RETURN), "The answer is 4."),
        (toks(CHANNEL, "final", " today it rains", RETURN), "today it rains"),  # " to" not "to="
        (toks(CHANNEL, "final", " json is a format", RETURN), "json is a format"),
        (toks(CHANNEL, "Hello world", RETURN), "Hello world"),  # unknown word, not confirmed
        (toks("I'm sorry, but I can't help with that.", RETURN),  # no header at all
         "I'm sorry, but I can't help with that."),
    ],
)  # fmt: skip
def test_2_missing_message_token_final(tokens: list[int], expected: str) -> None:
    events = merged(parse(tokens))
    assert events[0] == ContentDelta(expected, "final") and events[-1] == Done("stop")


@pytest.mark.parametrize("header", [" json", "", " <|constrain|>json"])
def test_2_missing_message_token_tool_call(header: str) -> None:
    tokens = toks(CHANNEL, "commentary to=functions.get_weather")
    tokens += toks(" ", CONSTRAIN, "json") if "constrain" in header else toks(header)
    assert merged(parse(tokens + toks(ARGS, CALL))) == call_events(0, "get_weather") + [
        Done("tool_calls")
    ]


def test_2_terminator_right_after_header() -> None:
    tokens = THINK + toks(START, "assistant", CHANNEL, "commentary to=functions.get_location", CALL)
    assert merged(parse(tokens)) == THOUGHT + [
        ToolCallStart(0, "call_0", "get_location"),
        MessageEnd("commentary", "functions.get_location"),
        Done("tool_calls"),
    ]
    assert merged(parse(toks(CHANNEL, "final", " to", RETURN))) == [
        MessageEnd("final", None),  # half a header word is dropped, not shown
        Done("stop"),
    ]


def test_3_return_after_end() -> None:
    assert merged(parse(SPEC_A[:-1] + [END, RETURN])) == SPEC_A_EVENTS
    assert parse(SPEC_A[:-1] + [END, END, RETURN] + toks("junk")) == parse(SPEC_A)


@pytest.mark.parametrize("ending", [[END], [], [RETURN], [END, RETURN]])
@pytest.mark.parametrize("reason", [None, "stop"])
def test_4_tool_call_without_call_token(ending: list[int], reason: str | None) -> None:
    header = toks(START, "assistant", CHANNEL, "commentary to=functions.get_weather json")
    tokens = THINK + header + toks(MESSAGE, ARGS) + ending
    assert merged(parse(tokens, reason)) == THOUGHT + call_events(0, "get_weather") + [
        Done("tool_calls")
    ]


@pytest.mark.parametrize(
    "after_end",
    [
        toks("assistant", CHANNEL, "commentary to=functions.get_weather json", MESSAGE),
        toks("comment", "ary", " to=functions.get_weather", " json", MESSAGE),  # vllm#22515
        toks(START, "assistant", "commentary", " to=functions.get_weather", MESSAGE),
        toks(START, "assistant", "assistant", CHANNEL, "commentary to=functions.get_weather")
        + toks(MESSAGE),  # "Unknown role: assistantassistant"
        toks("to=functions.get_weather", CHANNEL, "commentary", MESSAGE),
        toks(START, "assistant<|channel|>commentary to=functions.get_weather<|message|>"),
    ],
)
def test_5_header_words_as_plain_text_tool_call(after_end: list[int]) -> None:
    events = merged(parse(THINK + after_end + toks(ARGS, CALL)))
    assert events[:4] == THOUGHT + call_events(0, "get_weather")[:2]
    assert events[4].recipient == "functions.get_weather" and events[5:] == [Done("tool_calls")]


@pytest.mark.parametrize(
    "after_end, channel",
    [
        (toks("assistant", CHANNEL, "final", MESSAGE), "final"),  # unsloth#5162
        (toks("assistant", "final"), "final"),  # textgen#7374: "assistantfinal"
        (toks(" assistant", " final", MESSAGE), "final"),
        (toks(START, "assistant", "commentary", MESSAGE), "commentary"),
        (toks("comment", "ary", MESSAGE), "commentary"),
        (toks(START, "final", MESSAGE), "final"),  # role left out
        (toks(START, "assistant<|channel|>commentary<|message|>"), "commentary"),  # harmony#114
        (toks(START, "assistant<|channel|>final"), "final"),
    ],
)  # fmt: skip
def test_5_header_words_as_plain_text(after_end: list[int], channel: str) -> None:
    events = merged(parse(THINK + after_end + toks("Sunny, 22°C.", RETURN)))
    assert events == THOUGHT + [
        ContentDelta("Sunny, 22°C.", channel),
        MessageEnd(channel, None),
        Done("stop"),
    ]


def test_5_commentary_is_two_tokens_without_a_space() -> None:
    assert toks("commentary") == [12606, 815] and len(toks(" commentary")) == 1
    assert all(len(toks(w)) == len(toks(" " + w)) == 1 for w in ("assistant", "analysis", "final"))


@pytest.mark.parametrize("noise", [IGNORED, OUT_OF_RANGE])
def test_6_reserved_and_unknown_ids_are_ignored_anywhere(noise: list[int]) -> None:
    tool = THINK + toks(START, "assistant", CHANNEL, "comment", "ary to=functions.get_weather ")
    tool += toks(CONSTRAIN, "json", MESSAGE, "東京 🤖", CALL)
    for tokens in (SPEC_A, tool):
        noisy = [t for token in tokens for t in (noise[token % len(noise)], token)]
        assert parse(noisy + noise) == parse(tokens)
    assert merged(parse(noise)) == [Done("stop")]


def test_7_cut_mid_header_returns_only_what_is_complete() -> None:
    second = toks(START, "assistant", CHANNEL, "commentary to=functions.get_weather ", CONSTRAIN)
    second += toks("json")
    for cut in range(len(second) + 1):
        assert merged(parse(THINK + second[:cut], "length")) == THOUGHT + [Done("length")]
        assert merged(parse(THINK + second[:cut])) == THOUGHT + [Done("stop")]
    for cut in range(5):  # inside the first header, "<|channel|>comment ary to = functions"
        tokens = toks(CHANNEL, "commentary to=functions")[:cut]
        assert parse(tokens, "length") == [Done("length")]


@pytest.mark.parametrize(
    "header",
    [
        toks(" to=functions.get_weather", CHANNEL, "commentary", MESSAGE),
        toks(" to=functions.get_weather<|channel|>commentary", MESSAGE),  # as plain text
        toks(" to=functions.get_weather json", MESSAGE),
        toks(" to=functions.get_weather", CONSTRAIN, "json", MESSAGE),
        toks(" to=functions.get_weather", CHANNEL, "commentary", CONSTRAIN, "json", MESSAGE),
        toks(" to=functions.get_weather<|constrain|>json<|message|>"),
    ],
)
def test_8_tool_name_is_cleaned(header: list[int]) -> None:
    events = parse(THINK + toks(START, "assistant", CHANNEL, "commentary") + header + toks("{}"))
    (start,) = [e for e in events if isinstance(e, ToolCallStart)]
    assert start.name == "get_weather"
    assert messages(events)[-1][1:] == ("functions.get_weather", "{}")


def test_unknown_channel_with_message_token_is_final_answer() -> None:
    assert merged(parse(toks(CHANNEL, "foo", MESSAGE, "Hi", END))) == [
        ContentDelta("Hi", "final"),
        MessageEnd("foo", None),
        Done("stop"),
    ]


def test_new_header_inside_content_starts_a_new_message() -> None:
    tokens = toks(CHANNEL, "analysis", MESSAGE, "Think.", START, "assistant", CHANNEL, "final")
    tokens += toks(MESSAGE, "Answer.", MESSAGE, CONSTRAIN, RETURN, "ignored")
    assert merged(parse(tokens)) == [
        ReasoningDelta("Think."),
        MessageEnd("analysis", None),
        ContentDelta("Answer.", "final"),
        MessageEnd("final", None),
        Done("stop"),
    ]


@pytest.mark.parametrize("end", [[END], []])
def test_another_authors_turn_ends_the_output(end: list[int]) -> None:
    call = THINK + toks(CHANNEL, "commentary to=functions.get_weather", MESSAGE, ARGS) + end
    fake = toks(START, "functions.get_weather to=assistant", CHANNEL, "commentary", MESSAGE)
    tokens = call + fake + toks('{"temp": 20}', END, START, "assistant", CHANNEL, "final")
    assert parse(tokens + toks(MESSAGE, "Warm.", RETURN)) == parse(call)
    user = toks(START, "user", MESSAGE, "Thanks!", END)
    assert merged(parse(SPEC_A[:-1] + [END] + user)) == SPEC_A_EVENTS


def test_text_after_return_or_call_is_ignored() -> None:
    assert parse(SPEC_A + toks(CHANNEL, "final", MESSAGE, "more", END)) == parse(SPEC_A)
    tool = THINK + toks(CHANNEL, "commentary to=functions.get_weather", MESSAGE, ARGS, CALL)
    assert parse(tool + toks(START, "assistant", "Hi", RETURN)) == parse(tool)


# --- UTF-8 -------------------------------------------------------------------------------------

EMOJI_CJK = "東京の天気 🤖👍🏽 𝔘𝔫𝔦 🦜"


def test_multibyte_characters_split_across_tokens_are_never_emitted_half() -> None:
    body = toks(EMOJI_CJK)
    assert any(len(TOK.decode_single_token_bytes(t).decode(errors="ignore")) == 0 for t in body)
    for header in (toks(CHANNEL, "final", MESSAGE), toks(CHANNEL, "final")):  # also implicit
        events = parse(header + body + [RETURN])
        assert all("\ufffd" not in e.text for e in events if isinstance(e, ContentDelta))
        assert merged(events)[0] == ContentDelta(EMOJI_CJK, "final")
        assert len(events) > 8  # streamed in pieces, not all at the end
    args = '{"city": "東京 🤖"}'
    tool = toks(CHANNEL, "commentary to=functions.f", MESSAGE, args, CALL)
    assert messages(parse(tool)) == [("commentary", "functions.f", args)]


def test_invalid_utf8_is_replaced_not_raised() -> None:
    lead = TOK.encode_single_token(b"\xf0\x9f\xa4")  # first 3 bytes of a 4-byte character
    assert messages(parse(toks(CHANNEL, "final", MESSAGE, lead, "x", lead, END))) == [
        ("final", None, "\ufffdx\ufffd")
    ]


# --- agreement with openai-harmony on well-formed output -----------------------------------------

WELL_FORMED = [
    "<|channel|>analysis<|message|>Think.<|end|><|start|>assistant<|channel|>final<|message|>4<|return|>",
    "<|channel|>analysis<|message|>Need it.<|end|><|start|>assistant<|channel|>commentary "
    'to=functions.get_weather <|constrain|>json<|message|>{"a": 1}<|call|>',
    "<|channel|>analysis<|message|>Hm.<|end|><|start|>assistant to=functions.get_weather<|channel|>"
    'commentary json<|message|>{"b": 2}<|call|>',
    "<|channel|>commentary<|message|>Let me look.<|end|><|start|>assistant<|channel|>commentary "
    "to=functions.lookup <|constrain|>json<|message|>{}<|end|><|start|>assistant<|channel|>"
    'commentary to=functions.lookup <|constrain|>json<|message|>{"x": "東京 🤖"}<|call|>',
    '<|channel|>analysis to=browser.search code<|message|>{"query": "news"}<|call|>',
    "<|channel|>analysis to=python code<|message|>print(1 + 1)<|call|>",
    "<|channel|>final<|message|>Line one.\n\nLine two — 🦜 𝔘𝔫𝔦.<|return|>",
]  # fmt: skip


@pytest.fixture(scope="module")
def harmony() -> ModuleType:
    return pytest.importorskip("openai_harmony")


@pytest.fixture(scope="module")
def encoding(harmony: ModuleType) -> object:
    return harmony.load_harmony_encoding(harmony.HarmonyEncodingName.HARMONY_GPT_OSS)


@pytest.mark.parametrize("completion", WELL_FORMED)
def test_matches_openai_harmony(completion: str, harmony: ModuleType, encoding) -> None:
    tokens = encoding.encode(completion, allowed_special="all")
    theirs = encoding.parse_messages_from_completion_tokens(tokens, harmony.Role.ASSISTANT)
    assert messages(parse(tokens)) == [
        (m.channel, m.recipient, "".join(c.text for c in m.content)) for m in theirs
    ]
    streaming = harmony.StreamableParser(encoding, harmony.Role.ASSISTANT)
    deltas = ""
    for token in tokens:
        streaming.process(token)
        deltas += streaming.last_content_delta or ""
    assert deltas == "".join(text for _, _, text in messages(parse(tokens)))


# --- random sweeps -----------------------------------------------------------------------------

ORDINARY = [
    t for t in range(0, 199998, 97) if not set(TOK.decode_single_token_bytes(t)) & set(b"<|")
]


def check_invariants(events: list[Event]) -> None:
    assert isinstance(events[-1], Done) and sum(isinstance(e, Done) for e in events) == 1
    starts = [e for e in events if isinstance(e, ToolCallStart)]
    assert [s.index for s in starts] == list(range(len(starts)))
    assert len({s.id for s in starts}) == len(starts)
    assert all(NAME_RE.match(s.name) for s in starts)
    assert events[-1].finish_reason in ("stop", "length", "tool_calls")
    for i, e in enumerate(events):
        if isinstance(e, ToolCallDelta):
            assert any(isinstance(s, ToolCallStart) and s.index == e.index for s in events[:i])
        if isinstance(e, ReasoningDelta | ContentDelta):
            assert "<|" not in e.text and e.text


def test_random_token_soup_never_breaks_the_parser() -> None:
    rng = random.Random(0)
    pools = [ORDINARY, CONTROL, IGNORED + OUT_OF_RANGE, toks("assistant analysis commentary final")
             + toks(" to=functions.get_weather json") + toks("to=python code")]  # fmt: skip
    for _ in range(2000):
        tokens = [rng.choice(rng.choice(pools)) for _ in range(rng.randint(0, 40))]
        events = parse(tokens, rng.choice([None, "length"]))
        check_invariants(events)


# content tokens that can neither continue a header word nor a tool name before them
CONTENT = [
    t
    for t in toks(' Sunny, 22°C in 東京! {"city": "Paris", "days": [1, 2]} Okay? Yes.\n')
    if (s := TOK.decode_single_token_bytes(t).decode()).strip()
    and not re.match(r"[A-Za-z0-9_.\-]", s)
    and not any(w.startswith(s.strip()) for w in ("assistant", "analysis", "commentary", "final"))
]
TOOLS = ["functions.get_weather", "functions.lookup-v2", "browser.search", "python"]


def random_message(rng: random.Random, first: bool) -> tuple[list[int], dict]:
    """A message with header pieces in random order, some missing or repeated, maybe no
    <|start|> / <|message|>; returns its tokens and what the parser should report."""
    tokens = [START] if rng.random() < (0.3 if first else 0.7) else []
    channel = recipient = None
    kind = ""
    for _ in range(rng.randint(0, 4)):
        spaced = kind == "to" or rng.random() < 0.5  # a word glued to a name would extend it
        kind = rng.choice(["role", "channel", "word", "to"])
        if kind == "role":
            tokens += toks(" assistant" if spaced else "assistant")
        elif kind == "to":
            recipient = rng.choice(TOOLS)
            tokens += toks(" to=" + recipient)
        else:
            channel = rng.choice(["analysis", "commentary", "final"])
            word = " " + channel if spaced and kind == "word" else channel
            tokens += ([CHANNEL] if kind == "channel" else []) + toks(word)
    if recipient and rng.random() < 0.7:
        tokens += rng.choice([toks(" json"), toks(" code"), [CONSTRAIN, *toks("json")],
                              toks(" ", CONSTRAIN, "json")])  # fmt: skip
    explicit = rng.random() < 0.7
    tokens += [MESSAGE] if explicit else []
    body = [rng.choice(CONTENT) for _ in range(rng.randint(1, 6))]
    text = TOK.decode(body)
    expected = {"channel": channel, "recipient": recipient}
    expected["text"] = text if explicit else text.lstrip(" \t\r\n")
    return tokens + body, expected


def test_random_malformed_headers_never_leak() -> None:
    rng = random.Random(1)
    for _ in range(2000):
        tokens, want, ended = [], [], False
        for i in range(rng.randint(1, 4)):
            message, expected = random_message(rng, first=i == 0)
            if tokens and tokens[-1] not in (END, RETURN, CALL) and message[:1] != [START]:
                message = [START, *message]  # no terminator: only a new <|start|> can follow
            tokens += message
            want.append(expected)
            tokens += rng.choice([[END], [END], [RETURN], [CALL], []])
            if tokens[-1] in (RETURN, CALL):
                ended = True
                break
        noisy = [t for token in tokens for t in [token] + rng.sample(IGNORED, rng.randint(0, 1))]
        reason = rng.choice([None, "length"])
        events = parse(noisy, reason)
        check_invariants(events)
        got = messages(events)
        assert got == [(w["channel"], w["recipient"], w["text"]) for w in want], tokens
        names = [e.name for e in events if isinstance(e, ToolCallStart)]
        assert names == [w["recipient"].removeprefix("functions.") for w in want if w["recipient"]]
        calls = len(names)
        finish = "length" if reason == "length" and not ended else "stop"
        assert events[-1] == Done("tool_calls" if calls and finish == "stop" else finish)
        for e in events:
            text = e.text if isinstance(e, ReasoningDelta | ContentDelta) else ""
            assert "to=" not in text and not re.search(r"\b(assistant|analysis|final)\b", text)
