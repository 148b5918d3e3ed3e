"""Issue 16, server hardening, over real HTTP (uvicorn on 127.0.0.1, a scripted token source):
the API key, body and store limits, strict JSON, deep schemas, hostile input never a 500,
rendering off the event loop. The head timeout and shutdown: test_server_shutdown.py."""

import json
import random
import re
import socket
import threading
import time

import httpx2 as httpx
import pytest
from server_utils import ScriptedEngine, harmony_tokens, running_server

from moerun import cli
from moerun.server.bounded_store import BoundedStore
from moerun.server.options import exposure_warning
from moerun.server.state import ServerState

ANSWER = harmony_tokens("<|channel|>", "final", "<|message|>", "Hi there!", "<|return|>")
HELLO = [{"role": "user", "content": "Hello"}]
CHAT = {"model": "m", "messages": HELLO}


def check_error(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, (r.status_code, r.text)
    body = r.json()
    assert list(body) == ["error"] and set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


def raw_http(port: int, head: bytes, body: bytes = b"", timeout: float = 10) -> bytes:
    """What the server answers to these bytes, up to its closing the connection."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(head + body)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
    return out


def nested(depth: int) -> dict:
    schema: dict = {"type": "string"}
    for _ in range(depth // 2):  # each level: an object and its properties
        schema = {"type": "object", "properties": {"a": schema}}
    return schema


# ---- 1. the API key ------------------------------------------------------------------------
def test_an_empty_api_key_is_refused(capsys):
    with pytest.raises(ValueError, match="must not be empty"):
        ServerState(ScriptedEngine([ANSWER]), "m", api_key="")
    assert cli.main(["serve", "--model", "/nowhere", "--api-key", ""]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "--api-key must not be empty" in err
    assert exposure_warning("0.0.0.0", None) and exposure_warning("example.com", None)
    assert not any(exposure_warning(h, None) for h in ("127.0.0.1", "::1", "localhost"))
    assert exposure_warning("0.0.0.0", "key") is None


@pytest.mark.parametrize("metrics_no_auth", [False, True])
def test_api_key_scheme_and_open_routes(metrics_no_auth):
    state = ServerState(ScriptedEngine([ANSWER]), "m", api_key="k",
                        metrics_no_auth=metrics_no_auth)  # fmt: skip
    with running_server(state) as base:
        root = base.removesuffix("/v1")
        for scheme in ("Bearer", "bearer", "BEARER"):
            r = httpx.get(base + "/models", headers={"authorization": f"{scheme} k"})
            assert r.status_code == 200, scheme
        for header in ("Bearer wrong", "k", "Basic k", "Bearer", ""):
            r = httpx.get(base + "/models", headers={"authorization": header})
            assert check_error(r, 401)["code"] == "invalid_api_key"
        for path in ("/health", "/docs", "/redoc", "/openapi.json"):
            assert httpx.get(root + path).status_code == 200, path
        assert httpx.head(root + "/health").status_code == 200
        metrics = httpx.get(root + "/metrics")
        assert metrics.status_code == (200 if metrics_no_auth else 401)
        keyed = httpx.get(root + "/metrics", headers={"authorization": "Bearer k"})
        assert keyed.status_code == 200


# ---- 2. request bodies and the response store ----------------------------------------------
def test_request_body_limit():
    state = ServerState(ScriptedEngine([ANSWER]), "m", max_request_bytes=2048)
    with running_server(state) as base:
        port = int(base.split(":")[2].split("/")[0])
        head = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                b"Content-Type: application/json\r\n")  # fmt: skip
        # a Content-Length past the limit is answered before any of the body is sent
        out = raw_http(port, head + b"Content-Length: 100000000\r\n\r\n")
        status, _, body = out.partition(b"\r\n\r\n")
        assert status.startswith(b"HTTP/1.1 413")
        assert json.loads(body)["error"]["code"] == "request_too_large"
        # a chunked upload is counted as it arrives
        chunk = b'"' + b"x" * 998 + b'"'
        chunks = b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(3)) + b"0\r\n\r\n"
        chunked = head + b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
        out = raw_http(port, chunked, chunks)
        status, _, body = out.partition(b"\r\n\r\n")
        assert status.startswith(b"HTTP/1.1 413"), out[:200]
        assert b"request_too_large" in body
        ok = httpx.post(base + "/chat/completions", json=CHAT)  # under the limit: served
        assert ok.status_code == 200


def test_response_store_byte_budget_and_refusals_are_not_stored():
    engine = ScriptedEngine([ANSWER], max_model_len=50_000)
    state = ServerState(engine, "m", stored_responses=BoundedStore(60_000))
    with running_server(state) as base:
        ids = []
        for i in range(6):  # ~20 kB each: the budget keeps the newest two or three
            r = httpx.post(base + "/responses", json={"model": "m", "input": f"{i} " * 10_000})
            assert r.status_code == 200, r.text
            ids.append(r.json()["id"])
        store = state.stored_responses
        assert 0 < store.nbytes <= 60_000 and ids[-1] in store and ids[0] not in store
        kept = dict(store)
        refused = [
            {"model": "m", "input": "Hi", "max_output_tokens": 10**6},  # past the context
            {"model": "m", "input": "Hi", "metadata": {"x": float("nan")}},
            {"model": "m", "input": "Hi", "stream": True, "metadata": {"x": float("inf")}},
        ]
        for body in refused:
            r = httpx.post(base + "/responses", content=json.dumps(body),
                           headers={"content-type": "application/json"})  # fmt: skip
            check_error(r, 400)
        assert dict(store) == kept
    big = BoundedStore(10)
    big["a"] = "x" * 100  # larger than the whole budget: not kept
    assert "a" not in big and big.nbytes == 0


# ---- 10. strict JSON: NaN, Infinity, lone surrogates ---------------------------------------
@pytest.mark.parametrize(
    "raw, param",
    [
        ('{"model": "m", "input": "Hi", "metadata": {"x": NaN}}', "metadata.x"),
        ('{"model": "m", "input": "Hi", "temperature": Infinity}', "temperature"),
        ('{"model": "m", "input": "Hi", "top_p": 1e400}', "top_p"),
        ('{"model": "m", "input": [{"role": "user", "content": "\\ud800"}]}', "input.0.content"),
        ('{"model": "m", "input": "Hi", "metadata": {"\\udfff": 1}}', "metadata"),
    ],
)
def test_strict_json(raw, param):
    state = ServerState(ScriptedEngine([ANSWER]), "m")
    with running_server(state) as base:
        for stream in (False, True):
            body = raw.replace('"Hi"', '"Hi", "stream": true') if stream else raw
            r = httpx.post(base + "/responses", content=body,
                           headers={"content-type": "application/json"})  # fmt: skip
            assert check_error(r, 400)["param"] == param
        surrogate = b'{"model": "m", "messages": [{"role": "user", "content": "\xed\xa0\x80"}]}'
        r = httpx.post(base + "/chat/completions", content=surrogate,
                       headers={"content-type": "application/json"})  # fmt: skip
        assert check_error(r, 400)["param"] == "messages.0.content"
        assert len(state.stored_responses) == 0


# ---- 3. deep schemas, hostile input --------------------------------------------------------
def test_deep_schemas_are_a_400_naming_the_field():
    state = ServerState(ScriptedEngine([ANSWER]), "m")
    deep = nested(80)  # past the schema limit (64), within the body's (100)
    cases = [
        ("/chat/completions", {**CHAT, "tools": [{"type": "function", "function": {
            "name": "f", "parameters": deep}}]}, "tools.0.function.parameters"),
        ("/responses", {"model": "m", "input": "Hi", "tools": [{"type": "function", "name": "f",
                                                               "parameters": deep}]},
         "tools.0.*parameters"),  # a tagged union: pydantic may name the tag too
        ("/chat/completions", {**CHAT, "response_format": {"type": "json_schema", "json_schema": {
            "name": "r", "schema": deep}}}, "response_format.json_schema.schema"),
        ("/responses", {"model": "m", "input": "Hi", "text": {"format": {
            "type": "json_schema", "name": "r", "schema": deep}}}, "text.format.schema"),
    ]  # fmt: skip
    with running_server(state) as base:
        for path, body, param in cases:
            err = check_error(httpx.post(base + path, json=body), 400)
            assert re.fullmatch(param.replace(".", r"\.").replace("*", ".*"), err["param"])
            assert "nested more than 64 levels" in err["message"]
        for depth in (400, 100_000):  # the whole body: refused before anything recurses into it
            tools = [{"type": "function", "function": {"name": "f", "parameters": "@"}}]
            raw = json.dumps({**CHAT, "tools": tools}).replace('"@"', "[" * depth + "]" * depth)
            r = httpx.post(base + "/chat/completions", content=raw,
                           headers={"content-type": "application/json"})  # fmt: skip
            assert "nested more than" in check_error(r, 400)["message"]


FIELDS = ["model", "messages", "input", "tools", "role", "content", "type", "name", "parameters",
          "n", "max_tokens", "stop", "seed", "tool_choice", "x"]  # fmt: skip


def _hostile(rng: random.Random) -> bytes:
    """A request body: a valid one with random fields swapped in, cut short, or nested deep."""

    def value(depth: int = 0):
        kinds = ["int", "float", "str", "bool", "null"] + (["list", "dict"] if depth < 4 else [])
        kind = rng.choice(kinds)
        if kind == "int":
            return rng.choice([0, -1, 10**30, -(10**30), 2**64, 7])
        if kind == "float":
            return rng.choice([1e308, -1e308, 0.5, 1e-320, 3.0])
        if kind == "str":
            return rng.choice(["", "x" * 1000, "<|start|>", "\u202e", "m", "user", "function"])
        if kind == "list":
            return [value(depth + 1) for _ in range(rng.randrange(3))]
        if kind == "dict":
            return {rng.choice(FIELDS): value(depth + 1) for _ in range(rng.randrange(4))}
        return rng.choice([True, False, None])

    base = rng.choice([dict(CHAT), {"model": "m", "input": "Hi"}, {}])
    for _ in range(rng.randrange(1, 4)):
        base[rng.choice(list(base) or ["model"]) if rng.random() < 0.5 else "x"] = value()
    raw = json.dumps(base).encode()
    mangle = rng.randrange(8)
    if mangle == 0:
        return raw[: rng.randrange(len(raw))]  # cut short
    if mangle == 1:
        return b"[" * 5000 + b"]" * 5000
    if mangle == 2:
        return raw.replace(b"0", b"1" + b"0" * 5000, 1)  # an integer of 5000 digits
    if mangle == 3:  # a tool schema deep enough to overflow a recursive renderer
        tool = {"type": "function", "function": {"name": "f", "parameters": nested(900)}}
        return json.dumps({**CHAT, "tools": [tool]}).encode()
    return raw


def test_hostile_input_is_never_a_500():
    state = ServerState(ScriptedEngine([ANSWER]), "m")
    rng = random.Random(16)
    with running_server(state) as base, httpx.Client(timeout=30) as client:
        paths = ["/v1/chat/completions", "/v1/responses", "/v1/completions", "/tokenize"]
        for i in range(150):
            body = _hostile(rng)
            r = client.post(base.removesuffix("/v1") + paths[i % 4], content=body,
                            headers={"content-type": "application/json"})  # fmt: skip
            assert r.status_code < 500, (body[:300], r.text[:300])
            payload = r.json()  # JSON, whatever the status (SSE only for stream: true)
            if r.status_code >= 400:
                assert set(payload["error"]) == {"message", "type", "param", "code"}


class BrokenEngine(ScriptedEngine):
    async def generate(self, prompt, params, request_id, cache_salt=None):
        raise RuntimeError("a bug")
        yield  # an async generator, as the real one


def test_a_bug_is_a_500_in_openai_shape():
    with running_server(ServerState(BrokenEngine([ANSWER]), "m")) as base:
        err = check_error(httpx.post(base + "/chat/completions", json=CHAT), 500)
        assert err["type"] == "server_error" and "a bug" not in err["message"]
        with httpx.stream("POST", base + "/chat/completions", json={**CHAT, "stream": True}) as r:
            lines = [line for line in r.iter_lines() if line.startswith("data: ")]
        assert json.loads(lines[-2][6:])["error"]["type"] == "server_error"
        assert lines[-1] == "data: [DONE]"


# ---- 5. rendering off the event loop -------------------------------------------------------
def test_rendering_does_not_stall_the_event_loop():
    state = ServerState(ScriptedEngine([ANSWER]), "m")
    text = " ".join(f"word{i}" for i in range(1_000_000))  # ~11 MB: a second or two to tokenize
    with running_server(state) as base:
        root = base.removesuffix("/v1")
        done, took = threading.Event(), []

        def big() -> None:
            start = time.monotonic()
            body = {"model": "m", "messages": [{"role": "user", "content": text}]}
            r = httpx.post(base + "/chat/completions", json=body, timeout=60)
            took.append(time.monotonic() - start)
            assert r.status_code == 400  # rendered, then past the context
            done.set()

        worker = threading.Thread(target=big)
        worker.start()
        waits = []
        while not done.is_set():
            start = time.monotonic()
            assert httpx.get(root + "/health", timeout=60).status_code == 200
            waits.append(time.monotonic() - start)
            time.sleep(0.02)
        worker.join()
    assert took[0] > 0.8, "the request was too quick to show anything"
    assert max(waits) < 0.5, (max(waits), took)
