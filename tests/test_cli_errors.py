"""The command line's user errors are one line without a traceback, found before the model
loads where they can be; `moerun serve` says it is serving once its socket is bound."""

import socket
import subprocess
import sys
import time

import httpx2 as httpx
import pytest
import torch

from moerun import LLM
from moerun.cli import main, served_name
from moerun.errors import ConfigError

from conftest import SMALL


@pytest.fixture(scope="module")
def folder(make_checkpoint):
    return make_checkpoint(SMALL.replace(vocab_size=201088), layout="both")


def one_line_error(capsys, argv: list[str], *expected: str) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    assert err.startswith(f"moerun {argv[0]}: error: "), err
    for part in expected:
        assert part in err, err
    return err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("command", ["generate", "serve", "score", "bench"])
def test_device_cuda_without_cuda(capsys, folder, command):
    extra = {"generate": ["--prompt", "x"], "score": ["--tokens", "1,2"]}.get(command, [])
    argv = [command, "--model", str(folder), *extra, "--device", "cuda"]
    one_line_error(capsys, argv, "--device cuda", "CUDA is not available")


def test_port_in_use_and_out_of_range(capsys, folder):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        argv = ["serve", "--model", str(folder), "--port", str(port)]
        one_line_error(capsys, argv, f"port {port}", "in use")
    for bad in ("70000", "-1"):
        argv = ["serve", "--model", str(folder), "--port", bad]
        one_line_error(capsys, argv, f"--port must be in 0..65535, got {bad}")
    one_line_error(capsys, ["serve", "--model", str(folder), "--host", "no.such.host.invalid"],
                   "no.such.host.invalid")  # fmt: skip


def test_serving_is_announced_once_bound(folder):
    """Named after the model folder (not `original`), and said only once the port is taken."""
    cmd = [sys.executable, "-m", "moerun.cli", "serve", "--model", str(folder / "original"),
           "--port", "0", "--dtype", "float32", "--kv-cache-memory", "4MiB",
           "--max-model-len", "256"]  # fmt: skip
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stderr.readline()
        assert line.startswith(f"moerun: serving {folder.name} on http://127.0.0.1:"), line
        port = int(line.rsplit(":", 1)[1].split("/")[0])
        with socket.socket() as other, pytest.raises(OSError):
            other.bind(("127.0.0.1", port))
        deadline = time.monotonic() + 30
        while True:
            try:
                r = httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=5)
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline
                time.sleep(0.05)
        assert r.json()["data"][0]["id"] == folder.name
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_served_name():
    assert served_name("/models/gpt-oss-20b") == "gpt-oss-20b"
    assert served_name("/models/gpt-oss-20b/") == "gpt-oss-20b"
    assert served_name("/models/gpt-oss-20b/original") == "gpt-oss-20b"
    assert served_name("/models/gpt-oss-20b/original/") == "gpt-oss-20b"
    assert served_name("openai/gpt-oss-20b") == "openai/gpt-oss-20b"  # a Hugging Face id


def test_help_shows_defaults(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    for command, shown in [
        ("serve", ["--port PORT TCP port (0: any free one) (default: 8000)",
                   "(default: 127.0.0.1)", "(default: 8192)", "(default: bfloat16)"]),
        ("generate", ["(default: 64)", "(default: 1.0)"]),
        ("bench", ["(default: 1,4,16)", "(default: 512)"]),
        ("chat", ["(default: 2048)", "(default: medium)"]),
        ("synth", ["(default: tiny)"]),
    ]:  # fmt: skip
        with pytest.raises(SystemExit):
            main([command, "--help"])
        out = " ".join(capsys.readouterr().out.split())
        for part in shown:
            assert part in out, (command, part)
        assert "(default: None)" not in out and "(default: False)" not in out


def test_max_model_len_past_the_model_is_refused(capsys, folder):
    limit = SMALL.max_position_embeddings
    argv = ["generate", "--model", str(folder), "--prompt", "x", "--max-model-len", str(limit + 1)]
    one_line_error(capsys, argv, f"max_model_len {limit + 1}", f"{limit} tokens")
    with pytest.raises(ConfigError):
        LLM(str(folder), dtype="float32", max_model_len=limit + 1, kv_cache_memory="4MiB")
    llm = LLM(str(folder), dtype="float32", max_model_len=limit, kv_cache_memory="64MiB")
    assert llm.engine.max_model_len == limit


def test_bench_names_its_own_option(capsys, folder):
    one_line_error(capsys, ["bench", "--model", str(folder), "--batch", "a"], "--batch", "'a'")


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("{not json", "Expecting property name"),
        ('{"name": "f"}', "a JSON list"),
        ('[{"name": "bad name!"}]', "tools[0].name"),
        ('[{"type": "function", "function": {"name": "f", "parameters": 5}}]', "parameters"),
        ('["f"]', "tools[0].function must be an object"),
        ('[{"type": "web_search"}]', "only function tools"),
    ],
)
def test_chat_tools_file_is_checked_at_start_up(capsys, tmp_path, content, expected):
    path = tmp_path / "tools.json"
    path.write_text(content)
    # the model does not exist: the tools are checked before anything loads
    argv = ["chat", "--model", str(tmp_path / "no-model"), "--tools", str(path)]
    one_line_error(capsys, argv, str(path), expected)
    one_line_error(capsys, ["chat", "--model", "x", "--tools", str(tmp_path / "none.json")],
                   "none.json")  # fmt: skip
