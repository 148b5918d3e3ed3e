"""Client compatibility over real HTTP with a scripted token source: hosted Responses tools that
Codex CLI sends by default, the stored-response routes, /v1/models/{id}, HEAD /health, and the
latency / request metrics of non-streaming and abandoned requests."""

import json
import logging
import time
import warnings

import httpx2 as httpx
import openai
import pytest
from server_utils import ScriptedEngine, harmony_tokens, running_server

from moerun.server.app import create_app
from moerun.server.state import ServerState

from oracles import h_user, harmony_prompt, today

ANSWER = harmony_tokens(
    "<|channel|>", "analysis", "<|message|>", "Think.", "<|end|>",
    "<|start|>", "assistant", "<|channel|>", "final", "<|message|>", "Hello!", "<|return|>",
)  # fmt: skip
LONG = harmony_tokens("<|channel|>", "analysis", "<|message|>", "hmm " * 300)
CITY = {"type": "object", "properties": {"city": {"type": "string"}}}
FUNCTION = {"type": "function", "name": "get_weather", "description": "Weather now",
            "parameters": CITY}  # fmt: skip
# what Codex CLI and other agents send besides function tools
HOSTED = [
    {"type": "web_search"},
    {"type": "web_search_preview", "search_context_size": "medium"},
    {"type": "local_shell"},
    {"type": "file_search", "vector_store_ids": ["vs_1"]},
    {"type": "custom", "name": "apply_patch", "format": {"type": "grammar", "syntax": "lark"}},
    {"type": "namespace", "name": "mcp", "tools": [{"name": "x"}]},
]


@pytest.fixture(scope="module")
def served():
    state = ServerState(ScriptedEngine([ANSWER]), "m")
    with running_server(state) as base:
        yield base, state


def client(base: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=base, api_key="unused", max_retries=0)


def root(base: str) -> str:
    return base.removesuffix("/v1")


def check_error(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, (r.status_code, r.text)
    body = r.json()
    assert list(body) == ["error"] and set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


def sample(state: ServerState, name: str, **labels: str) -> float:
    return state.metrics.registry.get_sample_value(name, labels or None) or 0.0


# ---- 12. hosted tools are accepted and ignored ----------------------------------------------
def test_hosted_tools_are_ignored_and_function_tools_still_render(served, caplog):
    base, state = served
    state.engine.scripts = [ANSWER]
    body = {"model": "m", "input": "Hi", "tools": [*HOSTED, FUNCTION]}
    with caplog.at_level(logging.WARNING, logger="moerun.server"):
        for stream in (False, True):
            r = httpx.post(f"{base}/responses", json={**body, "stream": stream}, timeout=30)
            assert r.status_code == 200, r.text
            kinds = "custom,file_search,local_shell,namespace,web_search,web_search_preview"
            assert r.headers["x-moerun-ignored-tools"] == kinds
    # the prompt shows the function tool alone
    expected = harmony_prompt([h_user("Hi")], tools=[FUNCTION], date=today())
    assert state.engine.prompts[-1] == state.engine.prompts[-2] == expected
    warned = [rec.getMessage() for rec in caplog.records if "ignoring tools" in rec.getMessage()]
    assert len(warned) == len(HOSTED)  # one line per type, not per request
    out = client(base).responses.create(model="m", input="Hi", tools=[{"type": "web_search"}])
    assert out.output_text == "Hello!"


@pytest.mark.parametrize(
    "tool",
    [
        {**FUNCTION, "name": "bad name!"},
        {**FUNCTION, "parameters": "x"},
        {"type": "function"},
        {"name": "no_type"},
        {"type": 5},
    ],
)
def test_function_tools_are_still_validated(served, tool):
    base, _ = served
    r = httpx.post(f"{base}/responses", json={"model": "m", "input": "Hi", "tools": [tool]})
    assert check_error(r, 400)["type"] == "invalid_request_error"


# ---- 13. routes -------------------------------------------------------------------------------
def test_model_by_id_and_head_health(served):
    base, _ = served
    card = client(base).models.retrieve("m")
    assert (card.id, card.object, card.owned_by) == ("m", "model", "moerun")
    err = check_error(httpx.get(f"{base}/models/gpt-5"), 404)
    assert err["code"] == "model_not_found"
    check_error(httpx.get(f"{base}/models/org/gpt-5"), 404)
    with pytest.raises(openai.NotFoundError):
        client(base).models.retrieve("gpt-5")
    head = httpx.head(root(base) + "/health")
    assert head.status_code == 200 and head.content == b""


def test_openapi_schema_has_unique_operation_ids(served):
    """FastAPI warns (and clients generating code from the schema break) on a repeated id."""
    _, state = served
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        schema = create_app(state).openapi()
    ids = [op["operationId"] for path in schema["paths"].values() for op in path.values()]
    assert len(ids) == len(set(ids)) and "/health" in schema["paths"]


def test_get_and_delete_a_stored_response(served):
    base, state = served
    state.engine.scripts = [ANSWER]
    c = client(base)
    created = c.responses.create(model="m", input="Hi", instructions="Be brief.")
    got = c.responses.retrieve(created.id)
    assert got.to_dict() == created.to_dict()
    raw = httpx.get(f"{base}/responses/{created.id}").json()
    assert raw["status"] == "completed" and raw["id"] == created.id
    r = httpx.delete(f"{base}/responses/{created.id}")
    assert r.status_code == 200
    assert r.json() == {"id": created.id, "object": "response", "deleted": True}
    for method in ("GET", "DELETE"):
        err = check_error(httpx.request(method, f"{base}/responses/{created.id}"), 404)
        assert created.id in err["message"]
    check_error(httpx.get(f"{base}/responses/{created.id}/input_items"), 404)
    with pytest.raises(openai.NotFoundError):  # nor can a conversation continue from it
        c.responses.create(model="m", input="More", previous_response_id=created.id)
    unstored = c.responses.create(model="m", input="Hi", store=False)
    check_error(httpx.get(f"{base}/responses/{unstored.id}"), 404)


def test_input_items_list_the_whole_context(served):
    base, state = served
    state.engine.scripts = [ANSWER]
    c = client(base)
    first = c.responses.create(model="m", input="Hi")
    second = c.responses.create(model="m", input=[{"role": "user", "content": "Again?"}],
                                previous_response_id=first.id)  # fmt: skip
    page = httpx.get(f"{base}/responses/{second.id}/input_items", params={"order": "asc"}).json()
    assert set(page) == {"object", "data", "first_id", "last_id", "has_more"}
    assert page["object"] == "list" and page["has_more"] is False
    items = page["data"]
    # the first turn's input, its output (reasoning, message), then the new input
    assert [i["type"] for i in items] == ["message", "reasoning", "message", "message"]
    assert [i["id"] for i in items[1:3]] == [o.id for o in first.output]
    assert items[0]["content"] == [{"type": "input_text", "text": "Hi"}]
    assert items[3]["content"] == [{"type": "input_text", "text": "Again?"}]
    assert items[0]["role"] == items[3]["role"] == "user"
    assert page["first_id"] == items[0]["id"] and page["last_id"] == items[-1]["id"]
    assert len({i["id"] for i in items}) == 4
    # the default order is newest first; pages follow `after`
    listed = c.responses.input_items.list(second.id)
    assert [i.id for i in listed.data] == [i["id"] for i in reversed(items)]
    url = f"{base}/responses/{second.id}/input_items"
    one = httpx.get(url, params={"limit": 2, "order": "asc"}).json()
    assert [i["id"] for i in one["data"]] == [i["id"] for i in items[:2]] and one["has_more"]
    two = httpx.get(url, params={"limit": 2, "order": "asc", "after": one["last_id"]}).json()
    assert [i["id"] for i in two["data"]] == [i["id"] for i in items[2:]]
    assert two["has_more"] is False
    # the stored ids are stable, and the conversation continues from the listed items
    again = httpx.get(url, params={"order": "asc"}).json()
    assert again == page
    third = c.responses.create(model="m", input="More?", previous_response_id=second.id)
    assert third.status == "completed"
    for bad in ({"limit": 0}, {"limit": 101}, {"order": "up"}, {"after": "nope"}):
        check_error(httpx.get(url, params=bad), 400)


# ---- 11. metrics ------------------------------------------------------------------------------
def test_non_streaming_requests_time_their_tokens(served):
    base, state = served
    state.engine.scripts = [ANSWER]
    before = sample(state, "moerun_time_to_first_token_seconds_count")
    itl_before = sample(state, "moerun_inter_token_latency_seconds_count")
    c = client(base)
    c.chat.completions.create(model="m", messages=[{"role": "user", "content": "Hi"}])
    c.responses.create(model="m", input="Hi")
    assert sample(state, "moerun_time_to_first_token_seconds_count") == before + 2
    assert sample(state, "moerun_inter_token_latency_seconds_count") > itl_before


@pytest.mark.parametrize("stream", [False, True])
def test_abandoned_chat_requests_are_counted(served, stream):
    base, state = served
    state.engine.scripts, state.engine.delay = [LONG], 0.005
    label = {"endpoint": "chat", "finish_reason": "abort"}
    before = sample(state, "moerun_requests_total", **label)
    body = {"model": "m", "messages": [{"role": "user", "content": "Think."}], "stream": stream}
    try:
        if stream:
            with httpx.Client(timeout=30) as h, h.stream("POST", f"{base}/chat/completions",
                                                         json=body) as r:  # fmt: skip
                lines = r.iter_lines()
                for _ in range(4):
                    json.loads(next(line for line in lines if line.startswith("data: "))[6:])
        else:
            with pytest.raises(httpx.ReadTimeout):
                httpx.post(
                    f"{base}/chat/completions", json=body, timeout=httpx.Timeout(30, read=0.3)
                )
        deadline = time.monotonic() + 10
        while sample(state, "moerun_requests_total", **label) == before:
            assert time.monotonic() < deadline, "the abandoned request was never counted"
            time.sleep(0.02)
    finally:
        state.engine.delay = 0.0
    assert sample(state, "moerun_requests_total", **label) == before + 1
