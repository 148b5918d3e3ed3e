"""Chat Completions over real HTTP: uvicorn on 127.0.0.1, the `openai` client and raw httpx.

Numbers come from the real engine on a random checkpoint (usage, streaming, batching, aborts, KV
blocks); output shapes come from a ScriptedEngine (tool calls, malformed model output); prompts
are checked token for token against openai-harmony's renderer.
"""

import asyncio
import json
import random
import time
from typing import NamedTuple

import httpx2 as httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families
from server_utils import ScriptedEngine, harmony_tokens, running_server

from moerun.config import EngineConfig
from moerun.engine.llm_engine import LLMEngine
from moerun.harmony.parser import ContentDelta, HarmonyParser
from moerun.harmony.tokenizer import load_tokenizer
from moerun.sampling import SamplingParams
from moerun.server.engine_client import AsyncEngine
from moerun.server.state import ServerState

from conftest import SMALL
from oracles import h_assistant, h_call, h_result, h_user, harmony_prompt, today

MAX_LEN = 1024
HELLO = [{"role": "user", "content": "Hello"}]
WEATHER = {
    "type": "object",
    "properties": {
        "location": {"type": "string", "description": "City, e.g. Paris"},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"], "default": "celsius"},
    },
    "required": ["location"],
}
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Current weather.",
            "parameters": WEATHER,
        },
    },
    {"type": "function", "function": {"name": "get_time", "description": "Local time."}},
]
ARGS = '{"location": "Paris"}'
TOOL_CALL = harmony_tokens(
    "<|channel|>", "analysis", "<|message|>", "Need the weather.", "<|end|>",
    "<|start|>", "assistant", "<|channel|>", "commentary to=functions.get_weather ",
    "<|constrain|>", "json", "<|message|>", ARGS, "<|call|>",
)  # fmt: skip
ANSWER = harmony_tokens("<|channel|>", "final", "<|message|>", "Hi there!", "<|return|>")


class Served(NamedTuple):
    base: str  # http://127.0.0.1:PORT/v1
    state: ServerState
    llm: LLMEngine | None = None

    @property
    def root(self) -> str:
        return self.base.removesuffix("/v1")

    def client(self, key: str = "none") -> openai.OpenAI:
        return openai.OpenAI(base_url=self.base, api_key=key, max_retries=0)


@pytest.fixture(scope="module")
def real(make_checkpoint):
    folder = make_checkpoint(SMALL.replace(vocab_size=201088), layout="hf")
    cfg = EngineConfig(str(folder), dtype="float32", max_model_len=MAX_LEN,
                       kv_cache_memory="4MiB", block_size=8)  # fmt: skip
    llm = LLMEngine(cfg)
    state = ServerState(AsyncEngine(llm), "tiny-oss")
    with running_server(state) as base:
        yield Served(base, state, llm)


@pytest.fixture(scope="module")
def scripted():
    state = ServerState(ScriptedEngine([ANSWER]), "scripted-oss")
    with running_server(state) as base:
        yield Served(base, state)


def script(served: Served, *scripts: list[int]) -> ScriptedEngine:
    engine = served.state.engine
    engine.scripts = list(scripts)
    return engine


# ---- openai-harmony oracle --------------------------------------------------------------------
def oracle(msgs: list, effort: str = "medium", instructions=None, tools=None) -> list[int]:
    """The conversation rendered by openai-harmony, with today's date as the server sends it."""
    return harmony_prompt(msgs, effort, instructions, tools, date=today())


# ---- helpers -----------------------------------------------------------------------------------
def sse(served: Served, body: dict) -> list[dict | str]:
    """POST a streaming chat request; the `data:` payloads, JSON-decoded except `[DONE]`."""
    out: list[dict | str] = []
    url = f"{served.base}/chat/completions"
    with httpx.Client(timeout=60) as c, c.stream("POST", url, json=body) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("data: "):
                data = line.removeprefix("data: ")
                out.append(data if data == "[DONE]" else json.loads(data))
    return out


def check_stream_shape(events: list[dict | str], n: int = 1) -> list[dict]:
    """Valid chunk objects: role first, finish_reason last per choice, then [DONE]; the chunks."""
    assert events[-1] == "[DONE]" and "[DONE]" not in events[:-1]
    chunks = [e for e in events[:-1] if e["choices"]]  # drop the usage chunk
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
    assert len({c["id"] for c in events[:-1]}) == 1 and chunks[0]["id"].startswith("chatcmpl-")
    for i in range(n):
        mine = [ch for c in chunks for ch in c["choices"] if ch["index"] == i]
        assert mine[0]["delta"]["role"] == "assistant"
        assert all("role" not in ch["delta"] for ch in mine[1:])
        assert [ch["finish_reason"] is not None for ch in mine] == [False] * (len(mine) - 1) + [
            True
        ]
    return chunks


def joined(chunks: list[dict], key: str, i: int = 0) -> str:
    return "".join(
        ch["delta"].get(key) or "" for c in chunks for ch in c["choices"] if ch["index"] == i
    )


def post(served: Served, path: str, body=None, **kw) -> httpx.Response:
    url = served.root + path
    with httpx.Client(timeout=30) as c:
        return c.post(url, json=body, **kw) if body is not None else c.post(url, **kw)


def check_error(r: httpx.Response, status: int) -> dict:
    """OpenAI's error shape, with the expected status."""
    assert r.status_code == status, (r.status_code, r.text)
    body = r.json()
    assert list(body) == ["error"] and set(body["error"]) == {"message", "type", "param", "code"}
    err = body["error"]
    assert isinstance(err["message"], str) and err["message"] and isinstance(err["type"], str)
    return err


async def engine_tokens(engine: AsyncEngine, prompt: list[int], params: SamplingParams) -> list:
    """Token ids straight from the engine, as the oracle for what the server reports."""
    ids = []
    async for delta in engine.generate(prompt, params, f"oracle-{random.random()}"):
        ids += delta.token_ids
    return ids


def all_blocks_free(llm: LLMEngine) -> bool:
    pools = (llm.blocks.full, llm.blocks.windowed)
    return not llm.has_unfinished() and all(p.num_free == p.num_blocks for p in pools)


def wait_until(condition, timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def metric_values(served: Served) -> dict[tuple, float]:
    r = httpx.get(served.root + "/metrics")
    assert r.status_code == 200
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(r.text)
        for s in family.samples
    }


# ---- 1. real engine: objects, usage, streaming ------------------------------------------------
def test_chat_completion_usage_and_content_match_the_engine(real):
    k = 12
    count = post(real, "/tokenize", {"messages": HELLO}).json()["count"]
    out = real.client().chat.completions.create(
        model="tiny-oss", messages=HELLO, max_tokens=k, temperature=0, seed=3
    )
    assert out.object == "chat.completion" and out.id.startswith("chatcmpl-")
    assert out.model == "tiny-oss" and len(out.choices) == 1
    choice = out.choices[0]
    assert choice.index == 0 and choice.message.role == "assistant"
    # the same prompt straight through the engine: the server reports exactly those tokens
    prompt = post(real, "/tokenize", {"messages": HELLO}).json()["tokens"]
    params = SamplingParams(temperature=0, max_tokens=k)
    ids = asyncio.run(engine_tokens(real.state.engine, prompt, params))
    parser, text = HarmonyParser(), ""
    for event in [e for t in ids for e in parser.feed(t)] + parser.finish("length"):
        text += event.text if isinstance(event, ContentDelta) else ""
    assert len(ids) == k and choice.finish_reason == "length"  # random weights: no stop token
    assert choice.message.content == text and text
    assert out.usage.prompt_tokens == count == len(prompt)
    assert out.usage.completion_tokens == k
    assert out.usage.total_tokens == count + k


def test_streaming_concatenates_to_the_non_streamed_answer(real):
    body = {"model": "tiny-oss", "messages": HELLO, "max_tokens": 10, "temperature": 0, "seed": 7}
    whole = post(real, "/v1/chat/completions", body).json()
    prompt_tokens = whole["usage"]["prompt_tokens"]
    events = sse(real, {**body, "stream": True, "stream_options": {"include_usage": True}})
    chunks = check_stream_shape(events)
    assert joined(chunks, "content") == whole["choices"][0]["message"]["content"]
    assert chunks[-1]["choices"][0]["finish_reason"] == whole["choices"][0]["finish_reason"]
    usage = events[-2]
    assert usage["choices"] == [] and usage["usage"]["prompt_tokens"] == prompt_tokens
    assert usage["usage"]["completion_tokens"] == 10 == whole["usage"]["completion_tokens"]
    # the openai client reads the same stream
    stream = real.client().chat.completions.create(**body, stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text == whole["choices"][0]["message"]["content"]


def test_logprobs_and_n_choices(real):
    out = real.client().chat.completions.create(
        model="tiny-oss", messages=HELLO, max_tokens=6, temperature=0, n=2,
        logprobs=True, top_logprobs=3,
    )  # fmt: skip
    assert [c.index for c in out.choices] == [0, 1]
    assert out.choices[0].message.content == out.choices[1].message.content  # greedy
    assert out.usage.completion_tokens == 12
    entries = out.choices[0].logprobs.content
    assert entries and len(entries) <= 6
    for e in entries:
        assert e.logprob <= 0 and len(e.top_logprobs) == 3
        assert e.top_logprobs[0].logprob >= e.logprob - 1e-6  # greedy picks the top token
        assert bytes(e.bytes).decode("utf-8", "replace") == e.token
    text = b"".join(bytes(e.bytes) for e in entries).decode("utf-8", "replace")
    assert text.strip() == out.choices[0].message.content.strip()
    events = sse(real, {"model": "tiny-oss", "messages": HELLO, "max_tokens": 4, "n": 2,
                        "seed": 1, "stream": True})  # fmt: skip
    check_stream_shape(events, n=2)


# ---- 2. /tokenize equals openai-harmony --------------------------------------------------------
def test_tokenize_equals_openai_harmony(real):
    messages = [
        {"role": "system", "content": "Answer in French."},
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": "What is the weather in Paris?"},
    ]
    body = {"model": "tiny-oss", "messages": messages, "tools": TOOLS, "reasoning_effort": "high"}
    r = post(real, "/tokenize", body)
    assert r.status_code == 200
    got = r.json()
    want = oracle([h_user("What is the weather in Paris?")], "high",
                  "Answer in French.\n\nBe brief.", TOOLS)  # fmt: skip
    assert got["tokens"] == want
    assert got["count"] == len(want) and got["max_model_len"] == MAX_LEN
    plain = post(real, "/tokenize", {"messages": HELLO}).json()
    assert plain["tokens"] == oracle([h_user("Hello")])  # default effort medium, no developer
    out = real.client().chat.completions.create(
        model="tiny-oss", messages=messages, tools=TOOLS, reasoning_effort="high", max_tokens=1
    )
    assert out.usage.prompt_tokens == len(want)


# ---- 3. tool calls end to end -----------------------------------------------------------------
def test_tool_call_non_streaming(scripted):
    script(scripted, TOOL_CALL)
    out = scripted.client().chat.completions.create(
        model="scripted-oss", messages=[{"role": "user", "content": "Weather?"}], tools=TOOLS
    )
    choice = out.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    assert choice.message.model_extra["reasoning_content"] == "Need the weather."
    [call] = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather"
    assert call.id.startswith("call_") and len(call.id) > len("call_")
    assert json.loads(call.function.arguments) == {"location": "Paris"}
    assert out.usage.completion_tokens == len(TOOL_CALL)


def test_tool_call_streaming(scripted):
    script(scripted, TOOL_CALL)
    stream = scripted.client().chat.completions.create(
        model="scripted-oss", messages=[{"role": "user", "content": "Weather?"}], tools=TOOLS,
        stream=True,
    )  # fmt: skip
    chunks = list(stream)
    calls = [tc for c in chunks for tc in c.choices[0].delta.tool_calls or []]
    first, rest = calls[0], calls[1:]
    assert first.index == 0 and first.id.startswith("call_") and first.type == "function"
    assert first.function.name == "get_weather"
    assert rest and all(tc.index == 0 and tc.id is None and tc.function.name is None for tc in rest)
    assert "".join(tc.function.arguments or "" for tc in calls) == ARGS
    reasoning = "".join(c.choices[0].delta.model_extra.get("reasoning_content") or ""
                        for c in chunks)  # fmt: skip
    assert reasoning == "Need the weather."
    assert all(not c.choices[0].delta.content for c in chunks)
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_tool_result_goes_back_as_harmony(scripted):
    engine = script(scripted, TOOL_CALL, ANSWER)
    client = scripted.client()
    user = {"role": "user", "content": "Weather in Paris?"}
    first = client.chat.completions.create(model="scripted-oss", messages=[user], tools=TOOLS)
    msg = first.choices[0].message
    call = msg.tool_calls[0]
    messages = [
        user,
        {"role": "assistant", "content": None, "reasoning_content": msg.model_extra[
            "reasoning_content"], "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": '{"temp": 21}'},
    ]  # fmt: skip
    second = client.chat.completions.create(model="scripted-oss", messages=messages, tools=TOOLS)
    assert second.choices[0].message.content == "Hi there!"
    assert second.choices[0].finish_reason == "stop"
    convo = [
        h_user("Weather in Paris?"),
        h_assistant("Need the weather.", "analysis"),  # CoT kept during the tool loop
        h_call("get_weather", ARGS),
        h_result("get_weather", '{"temp": 21}'),
    ]
    assert engine.prompts[-1] == oracle(convo, tools=TOOLS)
    # the turn is over once the answer is in: harmony drops that turn's CoT from the next prompt
    answer = {"role": "assistant", "content": second.choices[0].message.content}
    third = [*messages, answer, {"role": "user", "content": "And tomorrow?"}]
    client.chat.completions.create(model="scripted-oss", messages=third, tools=TOOLS)
    convo += [h_assistant("Hi there!", "final"), h_user("And tomorrow?")]
    assert engine.prompts[-1] == oracle(convo, tools=TOOLS)
    assert "Need the weather." not in load_tokenizer().decode(engine.prompts[-1])


def full_call(name: str, args: str, reason: str | None = None) -> list[int]:
    """A call as the model writes it, after an analysis message when `reason` is given."""
    first = []
    if reason is not None:
        first = harmony_tokens("<|channel|>", "analysis", "<|message|>", reason, "<|end|>",
                               "<|start|>", "assistant")  # fmt: skip
    return first + harmony_tokens(
        "<|channel|>",
        f"commentary to=functions.{name} ",
        "<|constrain|>",
        "json",
        "<|message|>",
        args,
        "<|call|>",
    )


@pytest.mark.parametrize("stream", [False, True])
def test_tool_choice_named_lets_the_model_reason_then_call(scripted, stream):
    """A named choice is a grammar, not a prefilled header: the model may reason first."""
    engine = script(scripted, full_call("get_weather", ARGS, reason="Need the weather."))
    body = {"model": "scripted-oss", "messages": HELLO, "tools": TOOLS,
            "tool_choice": {"type": "function", "function": {"name": "get_weather"}}}  # fmt: skip
    if stream:
        chunks = check_stream_shape(sse(scripted, {**body, "stream": True}))
        calls = [tc for c in chunks for tc in c["choices"][0]["delta"].get("tool_calls", [])]
        assert calls[0]["function"]["name"] == "get_weather" and calls[0]["id"].startswith("call_")
        assert "".join(tc["function"]["arguments"] for tc in calls) == ARGS
        assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"
    else:
        out = post(scripted, "/v1/chat/completions", body).json()
        [call] = out["choices"][0]["message"]["tool_calls"]
        assert call["function"] == {"name": "get_weather", "arguments": ARGS}
        assert out["choices"][0]["message"]["reasoning_content"] == "Need the weather."
        assert out["choices"][0]["finish_reason"] == "tool_calls"
        assert out["usage"]["completion_tokens"] == len(engine.scripts[0])
    assert engine.prompts[-1] == oracle([h_user("Hello")], tools=TOOLS)


def test_tool_choice_required_and_none(scripted):
    engine = script(scripted, full_call("get_time", "{}"))
    client = scripted.client()
    out = client.chat.completions.create(
        model="scripted-oss", messages=HELLO, tools=TOOLS, tool_choice="required"
    )
    [call] = out.choices[0].message.tool_calls
    assert (call.function.name, call.function.arguments) == ("get_time", "{}")
    assert out.choices[0].finish_reason == "tool_calls"
    assert engine.prompts[-1] == oracle([h_user("Hello")], tools=TOOLS)
    script(scripted, ANSWER)
    out = client.chat.completions.create(
        model="scripted-oss", messages=HELLO, tools=TOOLS, tool_choice="none"
    )
    assert out.choices[0].message.content == "Hi there!"
    assert engine.prompts[-1] == oracle([h_user("Hello")])  # no tools rendered at all


def test_a_call_to_an_undeclared_tool_cannot_be_written(scripted):
    """tool_choice auto: the grammar allows only declared names, so a model heading for
    `functions.get_stock` is steered off it (greedy: the smallest allowed token instead)."""
    script(scripted, full_call("get_stock", "{}"))
    out = scripted.client().chat.completions.create(
        model="scripted-oss", messages=HELLO, tools=TOOLS, max_tokens=40
    )
    message = out.choices[0].message
    assert "get_stock" not in json.dumps(message.model_dump())
    for call in message.tool_calls or []:
        assert call.function.name in {"get_weather", "get_time"}


# ---- 4. malformed model output -----------------------------------------------------------------
def _random_ids(seed: int) -> list[int]:
    rng = random.Random(seed)
    special, ordinary = (199998, 201088), (0, 199998)
    return [rng.randrange(*rng.choice([special, ordinary])) for _ in range(60)]


MALFORMED = {
    "no_message_token": (harmony_tokens("<|channel|>", "final", " Hello there", "<|return|>"),
                         None, "Hello there"),
    "recipient_before_channel": (harmony_tokens(
        " to=functions.get_weather", "<|channel|>", "commentary", " ", "<|constrain|>", "json",
        "<|message|>", ARGS, "<|call|>"), None, None),
    "reserved_ids": (harmony_tokens("<|channel|>", "final", "<|message|>", "Hi", 200014, 199999,
                                    " there", 201000, 200001, "<|return|>"), None, "Hi there"),
    "cut_mid_header": (ANSWER, 3, None),
    "cut_in_second_header": (TOOL_CALL, 8, None),
    "spelled_out_markers": (load_tokenizer().encode_ordinary("<|channel|>final<|message|>Yes")
                            + harmony_tokens("<|return|>"), None, "Yes"),
    "start_without_end": (harmony_tokens("<|channel|>", "final", "<|message|>", "A", "<|start|>",
                                         "assistant", "<|channel|>", "final", "<|message|>", "B",
                                         "<|return|>"), None, "AB"),
    "made_up_tool_result": (TOOL_CALL[:-1] + harmony_tokens(
        "<|end|>", "<|start|>", "functions.get_weather to=assistant", "<|channel|>", "commentary",
        "<|message|>", "sunny", "<|end|>"), None, None),
    "empty": ([], None, None),
    **{f"random_{seed}": (_random_ids(seed), None, None) for seed in range(4)},
}  # fmt: skip


@pytest.mark.parametrize("name", list(MALFORMED))
def test_malformed_output_is_never_a_500(scripted, name):
    tokens, max_tokens, content = MALFORMED[name]
    script(scripted, tokens)
    body = {"model": "scripted-oss", "messages": HELLO}  # no tools: a tool request is grammar-bound
    if max_tokens:
        body["max_tokens"] = max_tokens
    r = post(scripted, "/v1/chat/completions", body)
    assert r.status_code == 200, r.text
    out = r.json()["choices"][0]
    msg = out["message"]
    texts = [msg["content"] or "", msg["reasoning_content"] or ""]
    texts += [c["function"]["name"] + c["function"]["arguments"] for c in msg["tool_calls"] or []]
    assert all("<|" not in t for t in texts), msg
    if content is not None:
        assert msg["content"] == content
    assert out["finish_reason"] == ("length" if max_tokens else out["finish_reason"])
    assert out["finish_reason"] in ("stop", "length", "tool_calls")
    if name in ("recipient_before_channel", "made_up_tool_result"):
        assert msg["tool_calls"] is None  # no tools declared: a call is never handed out
    chunks = check_stream_shape(sse(scripted, {**body, "stream": True}))
    assert joined(chunks, "content") == (msg["content"] or "")
    assert joined(chunks, "reasoning_content") == (msg["reasoning_content"] or "")
    assert chunks[-1]["choices"][0]["finish_reason"] == out["finish_reason"]


LOGPROB_SCRIPTS = {
    "headers": (harmony_tokens("<|channel|>", "analysis", "<|message|>", "Think.", "<|end|>",
                               "<|start|>", "assistant", "<|channel|>", "final", "<|message|>",
                               " Hello", " there", "<|return|>")),
    "reserved_inside": MALFORMED["reserved_ids"][0],
    "no_message_token": MALFORMED["no_message_token"][0],
    "utf8_split": harmony_tokens("<|channel|>", "final", "<|message|>")
    + load_tokenizer().encode_ordinary("Café 🎉 ok") + harmony_tokens("<|return|>"),
}  # fmt: skip


@pytest.mark.parametrize("name", list(LOGPROB_SCRIPTS))
def test_logprobs_cover_exactly_the_content(scripted, name):
    """Before: <|message|>, reserved ids and header text that the answer drops had entries.
    Now the entries' bytes join to the answer's bytes, streamed and not."""
    script(scripted, LOGPROB_SCRIPTS[name])
    body = {"model": "scripted-oss", "messages": HELLO, "logprobs": True}
    out = post(scripted, "/v1/chat/completions", body).json()["choices"][0]
    content = out["message"]["content"] or ""
    entries = out["logprobs"]["content"]
    got = bytes(b for e in entries for b in e["bytes"]).decode()
    if name == "no_message_token":  # header text became the answer: its first token is kept
        assert got.lstrip() == content and entries
    else:
        assert got == content
    chunks = check_stream_shape(sse(scripted, {**body, "stream": True}))
    streamed = [e for c in chunks if c["choices"] and c["choices"][0].get("logprobs")
                for e in c["choices"][0]["logprobs"]["content"]]  # fmt: skip
    assert streamed == entries


# ---- 5. concurrency, aborts, KV blocks --------------------------------------------------------
def test_32_concurrent_streams_then_all_blocks_free(real):
    prompts = [f"Question number {i % 4}" for i in range(32)]

    async def one(client: openai.AsyncOpenAI, text: str) -> tuple[str, str | None, int]:
        stream = await client.chat.completions.create(
            model="tiny-oss", messages=[{"role": "user", "content": text}], max_tokens=5,
            temperature=0, stream=True, stream_options={"include_usage": True},
        )  # fmt: skip
        content, reason, used = "", None, 0
        async for chunk in stream:
            if chunk.usage:
                used = chunk.usage.completion_tokens
            for choice in chunk.choices:
                content += choice.delta.content or ""
                reason = choice.finish_reason or reason
        return content, reason, used

    async def main() -> list:
        async with openai.AsyncOpenAI(base_url=real.base, api_key="x", max_retries=0) as client:
            return await asyncio.gather(*(one(client, p) for p in prompts))

    results = asyncio.run(main())
    assert all(reason == "length" and used == 5 for _, reason, used in results)
    for i in range(4):  # batched greedy requests with the same prompt give the same answer
        assert len({results[j][0] for j in range(i, 32, 4)}) == 1
    assert wait_until(lambda: all_blocks_free(real.llm))
    real.llm.blocks.check()
    gauges = metric_values(real)
    assert gauges[("moerun_kv_blocks_used", ())] == 0
    assert gauges[("moerun_requests_running", ())] == 0


@pytest.mark.parametrize("stream", [True, False])
def test_client_disconnect_aborts_the_request(real, monkeypatch, stream):
    aborted = []
    abort = real.llm.abort

    def recording_abort(request_id: str):
        out = abort(request_id)
        aborted.append((request_id, out))
        return out

    monkeypatch.setattr(real.llm, "abort", recording_abort)
    # ~900 tokens take seconds on this model: it cannot finish before the client leaves
    body = {"model": "tiny-oss", "messages": HELLO, "max_tokens": MAX_LEN - 100,
            "stream": stream, "temperature": 0}  # fmt: skip
    url = f"{real.base}/chat/completions"
    if stream:
        got = []
        with httpx.Client(timeout=30) as c, c.stream("POST", url, json=body) as r:
            for line in r.iter_lines():
                got += [line] if line.startswith("data: ") else []
                if len(got) == 3:  # the role chunk and two deltas
                    break
        assert len(got) == 3
    else:
        with pytest.raises(httpx.ReadTimeout):  # the client gives up waiting
            httpx.post(url, json=body, timeout=httpx.Timeout(30, read=0.5))
    assert wait_until(lambda: all_blocks_free(real.llm)), "the request was not aborted"
    live = [rid for rid, out in aborted if out is not None and rid.startswith("chatcmpl-")]
    assert len(live) == 1  # aborted while running, not finished on its own
    real.llm.blocks.check()


# ---- 6. bad input: OpenAI's error shape, never a 500 ------------------------------------------
OK = {"model": "scripted-oss", "messages": HELLO}
FN = {"name": "f", "description": "d"}
BAD_BODIES = {
    "temperature_type": ({**OK, "temperature": "hot"}, "temperature"),
    "messages_type": ({**OK, "messages": "hi"}, "messages"),
    "messages_empty": ({**OK, "messages": []}, "messages"),
    "bad_role": ({**OK, "messages": [{"role": "wizard", "content": "x"}]}, None),
    "content_type": ({**OK, "messages": [{"role": "user", "content": 5}]}, None),
    "image_part": ({**OK, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "x"}}]}]}, None),
    "params_not_object": ({**OK, "tools": [{"type": "function", "function": {
        **FN, "parameters": "x"}}]}, None),
    "params_list": ({**OK, "tools": [{"type": "function", "function": {
        **FN, "parameters": [1]}}]}, None),
    "bad_fn_name": ({**OK, "tools": [{"type": "function", "function": {
        **FN, "name": "get weather!"}}]}, None),
    "dotted_fn_name": ({**OK, "tools": [{"type": "function", "function": {
        **FN, "name": "get.weather"}}]}, None),
    "not_function_tool": ({**OK, "tools": [{"type": "code_interpreter"}]}, None),
    "temperature_high": ({**OK, "temperature": 2.5}, "temperature"),
    "temperature_negative": ({**OK, "temperature": -0.1}, "temperature"),
    "top_p_zero": ({**OK, "top_p": 0}, "top_p"),
    "top_p_high": ({**OK, "top_p": 1.5}, "top_p"),
    "n_zero": ({**OK, "n": 0}, "n"),
    "n_huge": ({**OK, "n": 1000}, "n"),
    "top_logprobs_high": ({**OK, "logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    "top_logprobs_negative": ({**OK, "logprobs": True, "top_logprobs": -1}, "top_logprobs"),
    "max_tokens_zero": ({**OK, "max_tokens": 0}, "max_tokens"),
    "unknown_tool_call_id": ({**OK, "messages": [*HELLO, {"role": "tool", "tool_call_id": "nope",
                                                          "content": "x"}]}, None),
    "args_not_string": ({**OK, "messages": [*HELLO, {"role": "assistant", "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "f", "arguments": {}}}]}]}, None),
    "effort": ({**OK, "reasoning_effort": "extreme"}, "reasoning_effort"),
    "stop_too_many": ({**OK, "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    "tool_choice_unknown": ({**OK, "tools": TOOLS, "tool_choice": {
        "type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    "tool_choice_required_without_tools": ({**OK, "tool_choice": "required"}, "tool_choice"),
    "tool_choice_word": ({**OK, "tool_choice": "sometimes"}, None),
    "seed_huge": ({**OK, "seed": 2**70}, None),
    "missing_model": ({"messages": HELLO}, "model"),
    "body_is_a_list": ([1, 2], None),
}  # fmt: skip


@pytest.mark.parametrize("name", list(BAD_BODIES))
def test_bad_request_bodies_are_400(scripted, name):
    body, param = BAD_BODIES[name]
    err = check_error(post(scripted, "/v1/chat/completions", body), 400)
    assert err["type"] == "invalid_request_error"
    if param:
        assert err["param"] == param


@pytest.mark.parametrize("raw", [b"{not json", b"", b'{"model": "m", "messages": [', b"\xff\xfe"])
def test_malformed_json_is_400(scripted, raw):
    r = post(scripted, "/v1/chat/completions", content=raw,
             headers={"content-type": "application/json"})  # fmt: skip
    check_error(r, 400)


def test_context_length_exceeded(real):
    client = real.client()
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny-oss", messages=HELLO, max_tokens=MAX_LEN)
    assert e.value.status_code == 400 and e.value.code == "context_length_exceeded"
    long = [{"role": "user", "content": "word " * MAX_LEN}]
    for stream in (False, True):
        body = {"model": "tiny-oss", "messages": long, "stream": stream}
        err = check_error(post(real, "/v1/chat/completions", body), 400)
        assert err["code"] == "context_length_exceeded"
    # the limit is inclusive: prompt + max_tokens == max_model_len runs, one more is refused
    near = [{"role": "user", "content": "word " * (MAX_LEN - 80)}]
    count = post(real, "/tokenize", {"messages": near}).json()["count"]
    room = MAX_LEN - count
    assert 1 <= room <= 30
    body = {"model": "tiny-oss", "messages": near, "max_tokens": room + 1}
    assert check_error(post(real, "/v1/chat/completions", body), 400)["code"] == (
        "context_length_exceeded"
    )
    out = client.chat.completions.create(model="tiny-oss", messages=near, max_tokens=room)
    assert out.usage.prompt_tokens + out.usage.completion_tokens <= MAX_LEN
    out = client.chat.completions.create(model="tiny-oss", messages=near)  # max_tokens: the rest
    assert out.usage.completion_tokens <= room and out.choices[0].finish_reason is not None


def test_unknown_model_and_routes(scripted):
    err = check_error(post(scripted, "/v1/chat/completions", {**OK, "model": "gpt-5"}), 404)
    assert err["code"] == "model_not_found" and err["param"] == "model"
    check_error(post(scripted, "/tokenize", {**OK, "model": "gpt-5"}), 404)
    with pytest.raises(openai.NotFoundError):
        scripted.client().chat.completions.create(model="gpt-5", messages=HELLO)
    check_error(httpx.get(scripted.root + "/v1/nothing"), 404)
    check_error(httpx.get(scripted.base + "/chat/completions"), 405)


def test_api_key():
    state = ServerState(ScriptedEngine([ANSWER]), "keyed", api_key="k")
    with running_server(state) as base:
        served = Served(base, state)
        for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": "k"}):
            r = httpx.post(base + "/chat/completions", json={**OK, "model": "keyed"},
                           headers=headers)  # fmt: skip
            assert check_error(r, 401)["code"] == "invalid_api_key"
            check_error(httpx.get(base + "/models", headers=headers), 401)
        assert httpx.get(served.root + "/health").status_code == 200
        check_error(httpx.get(served.root + "/metrics"), 401)  # traffic: the key (issue 16)
        with pytest.raises(openai.AuthenticationError):
            served.client("wrong").models.list()
        out = served.client("k").chat.completions.create(model="keyed", messages=HELLO)
        assert out.choices[0].message.content == "Hi there!"


def test_openai_client_sees_400s(scripted):
    client = scripted.client()
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="scripted-oss", messages=HELLO, temperature=3)
    assert e.value.body["param"] == "temperature"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(
            model="scripted-oss", messages=[*HELLO, {"role": "tool", "tool_call_id": "x",
                                                     "content": "?"}])  # fmt: skip


# ---- 7. /metrics, /v1/models, /health --------------------------------------------------------
def test_metrics_models_health(real):
    assert httpx.get(real.root + "/health").status_code == 200
    models = real.client().models.list()
    assert [m.id for m in models.data] == ["tiny-oss"]
    raw = httpx.get(real.base + "/models").json()
    assert raw["object"] == "list" and raw["data"][0]["max_model_len"] == MAX_LEN
    before = metric_values(real)
    label = (("endpoint", "chat"), ("finish_reason", "length"))
    out = real.client().chat.completions.create(
        model="tiny-oss", messages=HELLO, max_tokens=4, temperature=0
    )
    events = sse(real, {"model": "tiny-oss", "messages": HELLO, "max_tokens": 3, "stream": True})
    check_stream_shape(events)
    after = metric_values(real)

    def moved(name: str, labels: tuple = ()) -> float:
        return after[(name, labels)] - before.get((name, labels), 0.0)

    assert moved("moerun_prompt_tokens_total") == 2 * out.usage.prompt_tokens
    assert moved("moerun_generation_tokens_total") == 4 + 3
    assert moved("moerun_requests_total", label) == 2
    assert after[("moerun_time_to_first_token_seconds_count", ())] >= 1
    assert after[("moerun_kv_blocks_total", ())] > 0
