"""`stop` strings: StopMatcher on plain strings, then end to end through a chat request."""

import json
import random

import httpx2 as httpx
import pytest
from server_utils import ScriptedEngine, harmony_tokens, running_server

from moerun.server.state import ServerState
from moerun.server.stop_strings import StopMatcher


def run(stops: list[str], chunks: list[str]) -> tuple[list[str], str, bool]:
    """(text emitted per chunk, text flushed at the end, stopped)."""
    m = StopMatcher(stops)
    out = [m.feed(c) for c in chunks]
    return out, m.flush(), m.stopped


def expected(stops: list[str], chunks: list[str]) -> str:
    """The oracle: after the first chunk that completes a stop string, the text up to the
    earliest stop string seen so far (text is streamed: a stop completing later never counts)."""
    text = ""
    for chunk in chunks:
        text += chunk
        hits = [i for i in (text.find(s) for s in stops) if i >= 0]
        if hits:
            return text[: min(hits)]
    return text


def test_no_stops_passes_everything_through():
    assert run([], ["Hello", " world"]) == (["Hello", " world"], "", False)
    assert run([""], ["a"]) == (["a"], "", False)  # an empty stop string is no stop string


def test_stop_inside_one_chunk():
    assert run(["END"], ["The answer END more"]) == (["The answer "], "", True)


def test_stop_across_chunk_boundaries():
    out, tail, stopped = run(["lo wor"], ["Hel", "lo", " wo", "rld", "!"])
    assert out == ["He", "l", "", "", ""] and tail == "" and stopped  # "l" may start "lo wor"
    out, tail, stopped = run(["<END>"], ["a<", "E", "N", "D", ">b"])
    assert "".join(out) == "a" and stopped


def test_held_text_that_is_no_stop_is_released():
    out, tail, stopped = run(["END"], ["ab E", "N", "x", "EN"])
    assert out == ["ab ", "", "ENx", ""] and tail == "EN" and not stopped


def test_overlapping_prefixes():
    # "abc" is held as a prefix of "abcd"; then "bcx" completes inside it, one char later
    out, tail, stopped = run(["abcd", "bcx"], ["ab", "c", "x", "tail"])
    assert "".join(out) == "a" and stopped and tail == ""
    # a stop that is a prefix of another: the shorter one completes first
    assert "".join(run(["aa", "aab"], ["xa", "ab"])[0]) == "x"
    # self-overlapping stop: "aab" inside "aaab"
    assert "".join(run(["aab"], ["a", "a", "a", "b"])[0]) == "a"


def test_earliest_of_several_stops_wins():
    out, _, stopped = run(["world", "lo"], ["hello world"])
    assert out == ["hel"] and stopped
    out, _, _ = run(["STOP", "\n\n"], ["line one\n", "\nline STOP"])
    assert "".join(out) == "line one"


def test_nothing_after_a_stop():
    m = StopMatcher(["x"])
    assert m.feed("abxcd") == "ab" and m.stopped
    assert m.feed("more x") == "" and m.flush() == ""


def test_random_streams_match_the_oracle():
    rng = random.Random(0)
    for _ in range(500):
        stops = ["".join(rng.choices("ab", k=rng.randint(1, 4))) for _ in range(rng.randint(1, 3))]
        text = "".join(rng.choices("abc", k=rng.randint(0, 20)))
        cuts = sorted(rng.sample(range(len(text) + 1), k=min(len(text) + 1, rng.randint(0, 5))))
        chunks = [text[i:j] for i, j in zip([0, *cuts], [*cuts, len(text)], strict=True)]
        m, emitted = StopMatcher(stops), ""
        want = expected(stops, chunks)
        for chunk in chunks:
            emitted += m.feed(chunk)
            assert want.startswith(emitted), (stops, chunks)  # never a piece of a stop string
        assert emitted + m.flush() == want, (stops, chunks)
        assert m.stopped == any(s in text for s in stops)
        assert not any(s in want for s in stops)


# ---- end to end -------------------------------------------------------------------------------
# pieces are encoded one by one, so the stop string "lo wor" spans three tokens
ANSWER = harmony_tokens(
    "<|channel|>", "analysis", "<|message|>", "Say hello world.", "<|end|>",
    "<|start|>", "assistant", "<|channel|>", "final", "<|message|>",
    "Hel", "lo", " wo", "rld", " and more", "<|return|>",
)  # fmt: skip


@pytest.fixture(scope="module")
def server():
    engine = ScriptedEngine([ANSWER])
    with running_server(ServerState(engine, "m")) as base:
        yield base, engine


def chat(base: str, **body) -> dict:
    body = {"model": "m", "messages": [{"role": "user", "content": "Hi"}], **body}
    r = httpx.post(f"{base}/chat/completions", json=body, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()


def stream(base: str, **body) -> list[dict]:
    body = {"model": "m", "messages": [{"role": "user", "content": "Hi"}], "stream": True, **body}
    with (
        httpx.Client(timeout=30) as c,
        c.stream("POST", f"{base}/chat/completions", json=body) as r,
    ):
        assert r.status_code == 200
        data = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert data[-1] == "[DONE]"
    return [json.loads(d) for d in data[:-1]]


def content_deltas(chunks: list[dict]) -> list[str]:
    return [c["choices"][0]["delta"]["content"] for c in chunks if c["choices"][0]["delta"].get(
        "content")]  # fmt: skip


def test_stop_string_cuts_the_answer(server):
    base, engine = server
    out = chat(base, stop=["lo wor"])
    choice = out["choices"][0]
    assert choice["message"]["content"] == "Hel" and choice["finish_reason"] == "stop"
    assert choice["message"]["reasoning_content"] == "Say hello world."  # stops apply to content
    assert engine.aborted and engine.aborted[-1].startswith(out["id"])  # generation was cut short
    assert out["usage"]["completion_tokens"] == ANSWER.index(harmony_tokens(" wo")[0]) + 2


def test_streaming_never_emits_part_of_the_stop_string(server):
    base, _ = server
    chunks = stream(base, stop=["lo wor", "zzz"])
    deltas = content_deltas(chunks)
    assert "".join(deltas) == "Hel"
    assert all("l" not in d[3:] and "lo" not in d for d in deltas)
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    # a string stop, and stops that never match: the full answer, flushed at the end
    assert chat(base, stop="rld")["choices"][0]["message"]["content"] == "Hello wo"
    full = stream(base, stop=["and more!", "xyz"])
    assert "".join(content_deltas(full)) == "Hello world and more"
    assert full[-1]["choices"][0]["finish_reason"] == "stop"


def test_stop_string_after_a_tool_call_keeps_the_call(server):
    base, engine = server
    tools = [{"type": "function", "function": {"name": "f", "description": "d"}}]
    engine.scripts = [
        harmony_tokens(
            "<|channel|>",
            "commentary to=functions.f ",
            "<|constrain|>",
            "json",
            "<|message|>",
            '{"stop": "here"}',
            "<|call|>",
        )  # fmt: skip
    ]
    try:
        out = chat(base, tools=tools, stop=["here", "stop"])  # only content is matched
    finally:
        engine.scripts = [ANSWER]
    [call] = out["choices"][0]["message"]["tool_calls"]
    assert call["function"]["arguments"] == '{"stop": "here"}'
    assert out["choices"][0]["finish_reason"] == "tool_calls"
