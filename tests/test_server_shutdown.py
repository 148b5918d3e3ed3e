"""Issue 16: the request-head timeout and graceful shutdown, on the server `moerun serve` runs
(shutdown.build_server) on a thread with a scripted token source; then a real `moerun serve`
process and real signals, end to end."""

import json
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import httpx2 as httpx
from server_utils import ScriptedEngine, _free_port, harmony_tokens
from test_server_hardening import ANSWER, CHAT, check_error, raw_http

from moerun.server import shutdown
from moerun.server.app import create_app
from moerun.server.limits import HTTPLimits
from moerun.server.state import ServerState

from conftest import SMALL

LONG = harmony_tokens("<|channel|>", "final", "<|message|>", *["word "] * 400, "<|return|>")


def wait_for(condition: Callable[[], bool], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


# ---- 6. the request-head timeout -----------------------------------------------------------
@contextmanager
def graceful(state: ServerState, timeout: float = 5, limits: HTTPLimits | None = None
             ) -> Iterator[tuple[str, shutdown.GracefulServer, threading.Thread]]:  # fmt: skip
    """The server `moerun serve` runs (shutdown.build_server), on a thread: yields its root URL,
    the server (to signal) and the thread (to join)."""
    port = _free_port()
    server = shutdown.build_server(create_app(state), state, "127.0.0.1", port, timeout, limits)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_for(lambda: server.started)
    try:
        yield f"http://127.0.0.1:{port}", server, thread
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def test_a_slow_request_head_is_cut_off():
    limits = HTTPLimits(header_timeout_s=0.5)
    with graceful(ServerState(ScriptedEngine([ANSWER]), "m"), limits=limits) as (root, _, _):
        port = int(root.rsplit(":", 1)[1])
        start = time.monotonic()
        assert raw_http(port, b"GET /health HTTP/1.1\r\nHost: x\r\n") == b""  # never finished
        assert raw_http(port, b"") == b""  # connected, then silent
        assert time.monotonic() - start < 4
        assert httpx.get(root + "/health").status_code == 200  # a whole head in time: served


# ---- 4. graceful shutdown ------------------------------------------------------------------
def read_stream(url: str, body: dict, out: list) -> threading.Thread:
    """A thread that appends the stream's `data:` payloads to `out`, started."""

    def read() -> None:
        with httpx.stream("POST", url, json=body, timeout=60) as r:
            out.extend(line[6:] for line in r.iter_lines() if line.startswith("data: "))

    thread = threading.Thread(target=read, daemon=True)
    thread.start()
    return thread


def test_shutdown_ends_streams_at_the_deadline():
    state = ServerState(ScriptedEngine([LONG], delay=0.02), "m")  # ~8 s of tokens
    with graceful(state, timeout=0.5) as (root, server, thread):
        chat: list[str] = []
        resp: list[str] = []
        readers = [
            read_stream(root + "/v1/chat/completions", {**CHAT, "stream": True}, chat),
            read_stream(root + "/v1/responses", {"model": "m", "input": "Hi", "stream": True},
                        resp),
        ]  # fmt: skip
        wait_for(lambda: len(chat) >= 3 and len(resp) >= 5)
        start = time.monotonic()
        server.handle_exit(signal.SIGTERM, None)
        refused = httpx.post(root + "/v1/chat/completions", json=CHAT)  # still listening
        assert check_error(refused, 503)["code"] == "server_shutting_down"
        thread.join(timeout=10)
        assert not thread.is_alive() and time.monotonic() - start < 0.5 + 2.5
        for reader in readers:
            reader.join(timeout=5)
    assert chat[-1] == "[DONE]"
    assert json.loads(chat[-2])["choices"][0]["finish_reason"] == "abort"
    last = json.loads(resp[-1])
    assert last["type"] == "response.incomplete"
    assert last["response"]["incomplete_details"] == {"reason": "server_shutdown"}


def test_shutdown_waits_for_running_requests_then_exits():
    state = ServerState(ScriptedEngine([ANSWER], delay=0.1), "m")  # ~1 s of tokens
    with graceful(state, timeout=30) as (root, server, thread):
        chat: list[str] = []
        reader = read_stream(root + "/v1/chat/completions", {**CHAT, "stream": True}, chat)
        wait_for(lambda: chat)
        start = time.monotonic()
        server.handle_exit(signal.SIGTERM, None)
        thread.join(timeout=10)
        assert not thread.is_alive() and time.monotonic() - start < 5  # not the 30 s deadline
        reader.join(timeout=5)
    assert chat[-1] == "[DONE]"
    assert json.loads(chat[-2])["choices"][0]["finish_reason"] == "stop"


def test_a_second_signal_exits_at_once(monkeypatch):
    exits: list[int] = []
    monkeypatch.setattr(shutdown.os, "_exit", exits.append)
    state = ServerState(ScriptedEngine([ANSWER]), "m")
    server = shutdown.build_server(create_app(state), state, "127.0.0.1", 0)
    server.handle_exit(signal.SIGINT, None)
    assert not exits and state.lifecycle.draining  # the first one drains
    server.handle_exit(signal.SIGTERM, None)
    assert exits == [128 + signal.SIGTERM]


def test_sigterm_ends_a_real_server(make_checkpoint, tmp_path):
    """`moerun serve` on a random checkpoint: SIGTERM during a long stream; the stream gets its
    last chunk, the process exits soon after the deadline."""
    folder = make_checkpoint(SMALL.replace(vocab_size=201088), layout="hf")
    port, log = _free_port(), tmp_path / "serve.log"
    args = [sys.executable, "-m", "moerun.cli", "serve", "--model", str(folder), "--port",
            str(port), "--dtype", "float32", "--max-model-len", "2048", "--kv-cache-memory",
            "8MiB", "--served-model-name", "m", "--shutdown-timeout", "1"]  # fmt: skip
    with log.open("w") as err:
        proc = subprocess.Popen(args, stderr=err)
    try:
        root = f"http://127.0.0.1:{port}"

        def up() -> bool:
            assert proc.poll() is None, log.read_text()
            try:
                return httpx.get(root + "/health").status_code == 200
            except httpx.TransportError:
                return False

        wait_for(up, timeout=120)
        # a random model at temperature 0 does not stop on its own: ~20 s of tokens
        body = {**CHAT, "max_tokens": 1900, "temperature": 0, "stream": True}
        got: list[str] = []
        reader = read_stream(root + "/v1/chat/completions", body, got)
        wait_for(lambda: len(got) >= 3)
        start = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0, log.read_text()
        # the deadline (1 s), the abort, then the interpreter's exit (seconds, with torch)
        assert time.monotonic() - start < 1 + 10
        reader.join(timeout=5)
        assert got[-1] == "[DONE]"
        assert json.loads(got[-2])["choices"][0]["finish_reason"] == "abort"
        assert "shutting down" in log.read_text()
    finally:
        proc.kill()
        proc.wait()
