"""POST /v1/responses through the real `openai` client against a scripted token source: output
items, streaming events, function calls, stored conversations, errors. Prompts are compared with
openai-harmony's rendering of the same conversation."""

import http.client
import json
import time
from types import SimpleNamespace
from urllib.parse import urlsplit

import openai
import pytest
from server_utils import ScriptedEngine, harmony_tokens, running_server

from moerun.harmony.tokenizer import load_tokenizer
from moerun.server import responses_store
from moerun.server import state as state_module
from moerun.server.state import ServerState

from oracles import h_assistant, h_call, h_result, h_user, harmony_prompt, today

THOUGHT, ANSWER = "The user greets me. Reply kindly.", "Hello! How can I help?"
ANSWER_SCRIPT = harmony_tokens(
    "<|channel|>", "analysis", "<|message|>", THOUGHT, "<|end|>",
    "<|start|>", "assistant", "<|channel|>", "final", "<|message|>", ANSWER, "<|return|>",
)  # fmt: skip
WEATHER = {
    "type": "object",
    "properties": {"city": {"type": "string"}},
    "required": ["city"],
}
TOOL = {
    "type": "function",
    "name": "get_weather",
    "description": "Weather now",
    "parameters": WEATHER,
}
HI = {"role": "user", "content": "Hi"}
ARGS, CALL_THOUGHT = '{"city": "Paris"}', "I need the weather in Paris."
CALL_SCRIPT = harmony_tokens(
    "<|channel|>", "analysis", "<|message|>", CALL_THOUGHT, "<|end|>",
    "<|start|>", "assistant", "<|channel|>", "commentary to=functions.get_weather ",
    "<|constrain|>", "json", "<|message|>", ARGS, "<|call|>",
)  # fmt: skip


def oracle(msgs: list, instructions: str | None = None, tools: list | None = None) -> list[int]:
    """openai-harmony's prompt for the conversation, as the server renders it today."""
    return harmony_prompt(msgs, instructions=instructions, tools=tools, date=today())


@pytest.fixture(scope="module")
def server():
    engine = ScriptedEngine([ANSWER_SCRIPT])
    state = ServerState(engine, "m")
    with running_server(state) as url:
        client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0)
        yield client, engine, state


def scripted(server, *scripts, delay: float = 0.0):
    client, engine, _ = server
    engine.scripts, engine.delay = list(scripts), delay
    return client, engine


def collect(stream) -> list[dict]:
    return [event.to_dict() for event in stream]


def without_ids(value):
    """A response with its generated ids and timestamps blanked, to compare two runs."""
    if isinstance(value, dict):
        return {
            k: "*" if k in ("id", "item_id", "call_id", "created_at") else without_ids(v)
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [without_ids(v) for v in value]
    return value


def squeeze(types: list[str]) -> list[str]:
    """Event types with each run of one delta type written once."""
    return [t for i, t in enumerate(types) if not (t.endswith(".delta") and types[i - 1] == t)]


def test_string_input(server):
    client, engine = scripted(server, ANSWER_SCRIPT)
    _, _, state = server
    resp = client.responses.create(model="m", input="Hi there", instructions="Be warm.")
    assert engine.prompts[-1] == oracle([h_user("Hi there")], instructions="Be warm.")
    assert resp.status == "completed" and resp.incomplete_details is None
    assert [item.type for item in resp.output] == ["reasoning", "message"]
    reasoning, message = resp.output
    assert reasoning.id.startswith("rs_") and reasoning.summary == []
    assert [(c.type, c.text) for c in reasoning.content] == [("reasoning_text", THOUGHT)]
    assert message.id.startswith("msg_") and message.role == "assistant"
    assert message.status == "completed" and message.content[0].type == "output_text"
    assert resp.output_text == ANSWER and message.content[0].annotations == []
    usage = resp.usage
    assert usage.input_tokens == len(engine.prompts[-1])
    assert usage.output_tokens == len(ANSWER_SCRIPT)
    assert usage.total_tokens == usage.input_tokens + usage.output_tokens
    assert 0 < usage.output_tokens_details.reasoning_tokens < usage.output_tokens
    assert usage.input_tokens_details.cached_tokens == 0
    assert resp.id.startswith("resp_") and resp.object == "response" and resp.model == "m"
    assert resp.instructions == "Be warm." and resp.reasoning.effort == "medium"
    assert resp.tool_choice == "auto" and resp.tools == [] and resp.store is True
    assert resp.temperature == 1.0 and resp.top_p == 1.0 and resp.error is None
    finished = state.metrics.registry.get_sample_value(
        "moerun_requests_total", {"endpoint": "responses", "finish_reason": "stop"}
    )
    assert finished >= 1


def test_streaming_events(server):
    client, engine = scripted(server, ANSWER_SCRIPT, ANSWER_SCRIPT)
    plain = client.responses.create(model="m", input="Hi there").to_dict()
    events = collect(client.responses.create(model="m", input="Hi there", stream=True))
    assert engine.prompts[-1] == engine.prompts[-2]
    item = ["response.output_item.added", "response.content_part.added"]
    done = ["response.content_part.done", "response.output_item.done"]
    assert squeeze([e["type"] for e in events]) == [
        "response.created", "response.in_progress",
        *item, "response.reasoning_text.delta", "response.reasoning_text.done", *done,
        *item, "response.output_text.delta", "response.output_text.done", *done,
        "response.completed",
    ]  # fmt: skip
    numbers = [e["sequence_number"] for e in events]
    assert numbers == sorted(set(numbers))
    created = events[0]["response"]
    assert created["status"] == "in_progress" and created["output"] == []
    deltas = {kind: "" for kind in ("reasoning_text", "output_text")}
    for e in events:
        kind = e["type"].removeprefix("response.").removesuffix(".delta")
        if e["type"].endswith(".delta"):
            deltas[kind] += e["delta"]
            assert e["output_index"] == (0 if kind == "reasoning_text" else 1)
    assert deltas == {"reasoning_text": THOUGHT, "output_text": ANSWER}
    texts = [e["text"] for e in events if e["type"].endswith("_text.done")]
    assert texts == [THOUGHT, ANSWER]
    final = events[-1]["response"]
    done_items = [e["item"] for e in events if e["type"] == "response.output_item.done"]
    assert done_items == final["output"]
    assert without_ids(final) == without_ids(plain)


def test_function_call_round_trip(server):
    client, engine = scripted(server, CALL_SCRIPT, CALL_SCRIPT, ANSWER_SCRIPT)
    question = {"role": "user", "content": "Weather in Paris?"}
    resp = client.responses.create(model="m", input=[question], tools=[TOOL])
    assert engine.prompts[-1] == oracle([h_user("Weather in Paris?")], tools=[TOOL])
    assert [item.type for item in resp.output] == ["reasoning", "function_call"]
    call = resp.output[1]
    assert call.name == "get_weather" and json.loads(call.arguments) == {"city": "Paris"}
    assert call.call_id.startswith("call_") and call.id.startswith("fc_")
    assert call.status == "completed" and resp.status == "completed"

    events = collect(
        client.responses.create(model="m", input=[question], tools=[TOOL], stream=True)
    )
    args = "".join(e["delta"] for e in events if e["type"].endswith("arguments.delta"))
    (args_done,) = [e for e in events if e["type"] == "response.function_call_arguments.done"]
    assert args == args_done["arguments"] == ARGS

    result = {"type": "function_call_output", "call_id": call.call_id, "output": '{"temp": 21}'}
    history = [question, *(item.to_dict() for item in resp.output), result]
    follow = client.responses.create(model="m", input=history, tools=[TOOL])
    assert engine.prompts[-1] == oracle(
        [
            h_user("Weather in Paris?"),
            h_assistant(CALL_THOUGHT, "analysis"),  # kept: the tool loop is still going
            h_call("get_weather", ARGS),
            h_result("get_weather", '{"temp": 21}'),
        ],
        tools=[TOOL],
    )
    assert follow.output_text == ANSWER


def test_forced_tool_choice(server):
    """A named choice is a grammar, not a prefilled header: the prompt is the plain prompt."""
    call = harmony_tokens("<|channel|>", "commentary to=functions.get_weather ", "<|constrain|>",
                          "json", "<|message|>", ARGS, "<|call|>")  # fmt: skip
    client, engine = scripted(server, call)
    choice = {"type": "function", "name": "get_weather"}
    resp = client.responses.create(model="m", input="Paris?", tools=[TOOL], tool_choice=choice)
    assert engine.prompts[-1] == oracle([h_user("Paris?")], tools=[TOOL])
    assert [(o.type, o.name, o.arguments) for o in resp.output] == [
        ("function_call", "get_weather", ARGS)
    ]
    assert resp.usage.input_tokens == len(engine.prompts[-1])
    assert resp.tool_choice.name == "get_weather"


def test_previous_response_id(server, monkeypatch):
    client, engine = scripted(server, ANSWER_SCRIPT)
    first = client.responses.create(model="m", input="Hi there", instructions="Be warm.")
    second = client.responses.create(model="m", input="Again?", previous_response_id=first.id)
    expected = [
        h_user("Hi there"),
        h_assistant(THOUGHT, "analysis"),  # harmony drops it: that turn is over
        h_assistant(ANSWER, "final"),
        h_user("Again?"),
    ]
    assert engine.prompts[-1] == oracle(expected, instructions="Be warm.")
    assert second.previous_response_id == first.id and second.instructions == "Be warm."
    third = client.responses.create(model="m", input="More?", previous_response_id=second.id)
    # harmony keeps CoT after the first final answer, so the second turn's reasoning stays
    again = [h_assistant(THOUGHT, "analysis"), h_assistant(ANSWER, "final"), h_user("More?")]
    assert engine.prompts[-1] == oracle([*expected, *again], instructions="Be warm.")
    assert third.status == "completed"

    unstored = client.responses.create(model="m", input="Hi", store=False)
    for missing in ("resp_nope", unstored.id):
        with pytest.raises(openai.NotFoundError) as err:
            client.responses.create(model="m", input="x", previous_response_id=missing)
        assert err.value.body["param"] == "previous_response_id"

    monkeypatch.setattr(responses_store, "MAX_STORED", 2)  # the store keeps only the newest
    kept = [client.responses.create(model="m", input="Hi").id for _ in range(3)]
    with pytest.raises(openai.NotFoundError):
        client.responses.create(model="m", input="x", previous_response_id=kept[0])
    assert client.responses.create(model="m", input="x", previous_response_id=kept[2]).output


def test_a_response_chain_keeps_its_first_date(server, monkeypatch):
    """The system message carries the conversation's start date: a chain that crosses
    midnight renders the same prefix (its prompt cache stays valid)."""
    client, engine = scripted(server, ANSWER_SCRIPT, ANSWER_SCRIPT, ANSWER_SCRIPT)
    first = client.responses.create(model="m", input="Hi there")
    today_prompt = engine.prompts[-1]
    clock = SimpleNamespace(strftime=lambda fmt, *a: "2099-01-01", time=time.time)
    monkeypatch.setattr(state_module, "time", clock)  # midnight has passed
    second = client.responses.create(model="m", input="Again?", previous_response_id=first.id)
    assert engine.prompts[-1][: len(today_prompt)] == today_prompt
    assert second.status == "completed"
    client.responses.create(model="m", input="New")  # a new conversation starts today
    assert "2099-01-01" in load_tokenizer().decode(engine.prompts[-1])


def test_max_output_tokens_cut(server):
    client, engine = scripted(server, ANSWER_SCRIPT)
    resp = client.responses.create(model="m", input="Hi there", max_output_tokens=5)
    assert resp.status == "incomplete" and resp.incomplete_details.reason == "max_output_tokens"
    assert resp.usage.output_tokens == 5 and resp.max_output_tokens == 5
    assert [item.type for item in resp.output] == ["reasoning"]
    assert THOUGHT.startswith(resp.output[0].content[0].text)
    events = collect(
        client.responses.create(model="m", input="Hi there", max_output_tokens=5, stream=True)
    )
    assert events[-1]["type"] == "response.incomplete"
    assert events[-1]["response"]["incomplete_details"] == {"reason": "max_output_tokens"}
    with pytest.raises(openai.BadRequestError) as err:
        client.responses.create(model="m", input="Hi", max_output_tokens=engine.max_model_len)
    assert err.value.code == "context_length_exceeded"


@pytest.mark.parametrize(
    ("kwargs", "where"),
    [
        ({"input": [{"type": "banana"}]}, "input[0]"),
        ({"input": [{"type": "function_call_output", "output": "x"}]}, "input[0]"),
        ({"input": [HI, {"type": "function_call_output", "output": "x"}]}, "input[1]"),
        ({"input": [{"type": "function_call_output", "call_id": "c9", "output": "x"}]}, "input[0]"),
        ({"input": [{"role": "user", "content": 5}]}, "input[0]"),
        (
            {"input": [{"type": "function_call", "call_id": "c", "name": "f", "arguments": {}}]},
            "[0]",
        ),
        ({"input": [{"role": "robot", "content": "Hi"}]}, "input[0]"),
        ({"input": 5}, "input"),
        ({"input": "Hi", "temperature": 3}, "temperature"),
        ({"input": "Hi", "tools": [TOOL], "tool_choice": {"type": "function", "name": "x"}}, "x"),
        ({"input": "Hi", "model": "other"}, None),
    ],
)
def test_bad_requests(server, kwargs, where):
    client, _ = scripted(server, ANSWER_SCRIPT)
    expected = openai.NotFoundError if where is None else openai.BadRequestError
    with pytest.raises(expected) as err:
        client.responses.create(**{"model": "m", **kwargs})
    assert err.value.body["type"] in ("invalid_request_error", "not_found_error")
    if where:
        assert where in err.value.body["message"]


def test_client_disconnect_aborts(server):
    long_thought = harmony_tokens("<|channel|>", "analysis", "<|message|>", "hmm " * 300)
    _, engine = scripted(server, long_thought, delay=0.005)
    parts = urlsplit(str(server[0].base_url))
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=5)
    body = {"model": "m", "input": "Think.", "stream": True}
    conn.request("POST", "/v1/responses", json.dumps(body), {"Content-Type": "application/json"})
    reply = conn.getresponse()
    assert reply.status == 200
    seen = b""
    while seen.count(b"response.reasoning_text.delta") < 6:
        seen += reply.read1(4096)
    conn.close()
    deadline = time.monotonic() + 5
    while not engine.aborted and time.monotonic() < deadline:
        time.sleep(0.02)
    assert engine.aborted and engine.aborted[-1].startswith("resp_")
    assert engine.active == 0


class RefusingEngine(ScriptedEngine):
    """Refuses every prompt the way AsyncEngine does (ValueError from the stream)."""

    async def generate(self, prompt, params, request_id, cache_salt=None):
        self.prompts.append(list(prompt))
        raise ValueError("prompt does not fit the KV cache")
        yield  # an async generator, like the real one


def test_engine_refusal():
    with running_server(ServerState(RefusingEngine([ANSWER_SCRIPT]), "m")) as url:
        client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0)
        with pytest.raises(openai.BadRequestError, match="KV cache"):
            client.responses.create(model="m", input="Hi")
        events = collect(client.responses.create(model="m", input="Hi", stream=True))
    assert [e["type"] for e in events] == [
        "response.created",
        "response.in_progress",
        "response.failed",
    ]
    assert events[-1]["response"]["status"] == "failed"
    assert "KV cache" in events[-1]["response"]["error"]["message"]


def test_an_error_in_the_stored_conversation_names_it_not_a_negative_input_index():
    from moerun.server.errors import APIError
    from moerun.server.responses_input import to_messages

    stored = [{"type": "function_call", "call_id": "c1", "name": "functions.", "arguments": "{}"}]
    with pytest.raises(APIError) as e:
        to_messages([*stored, {"role": "user", "content": "Hi"}], first_new=1)
    assert "previous_response_id item 0" in e.value.message and "input[-1]" not in e.value.message
