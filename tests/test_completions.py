"""POST /v1/completions over real HTTP. Numbers from the real engine on a random checkpoint in
float32: echoed prompt logprobs equal `moerun score`'s (the way lm-evaluation-harness scores),
generated text equals the engine's tokens. Stop strings and the stop token on a scripted source."""

import asyncio
import json
import random

import httpx2 as httpx
import openai
import pytest
import torch
from server_utils import ScriptedEngine, harmony_tokens, running_server

from moerun.config import EngineConfig
from moerun.engine.llm_engine import LLMEngine
from moerun.harmony.tokenizer import load_tokenizer
from moerun.model.checkpoint import load_checkpoint
from moerun.model.gpt_oss import Transformer
from moerun.sampling import SamplingParams
from moerun.scoring import score
from moerun.server.engine_client import AsyncEngine
from moerun.server.metrics import Metrics
from moerun.server.state import ServerState

from conftest import SMALL

MAX_LEN = 512
TEXT = "The quick brown fox jumps over the lazy dog. Café, naïve, 東京."


@pytest.fixture(scope="module")
def folder(make_checkpoint):
    return make_checkpoint(SMALL.replace(vocab_size=201088), layout="hf")


def _cfg(folder) -> EngineConfig:
    return EngineConfig(str(folder), dtype="float32", max_model_len=MAX_LEN,
                        kv_cache_memory="4MiB", block_size=8)  # fmt: skip


@pytest.fixture(scope="module")
def real(folder):
    state = ServerState(AsyncEngine(LLMEngine(_cfg(folder))), "tiny-oss")
    with running_server(state) as base:
        yield base, state


@pytest.fixture(scope="module")
def scored(folder):
    """moerun score's per-token logprobs: tokens -> [None, lp1, ...]."""
    model = Transformer.from_checkpoint(load_checkpoint(folder), torch.float32)
    return lambda tokens: score(model, tokens).logprobs


def post(base: str, body: dict) -> httpx.Response:
    return httpx.post(f"{base}/completions", json={"model": "tiny-oss", **body}, timeout=60)


def check_error(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, (r.status_code, r.text)
    body = r.json()
    assert list(body) == ["error"] and set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


def close(ours: list, expected: list, tol: float = 1e-4) -> bool:
    assert ours[0] is None and expected[0] is None and len(ours) == len(expected)
    return max(abs(a - b) for a, b in zip(ours[1:], expected[1:], strict=True)) < tol


def sse(base: str, body: dict) -> list:
    out, url = [], f"{base}/completions"
    with (
        httpx.Client(timeout=60) as c,
        c.stream("POST", url, json={"model": "tiny-oss", **body}) as r,
    ):
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if line.startswith("data: "):
                data = line.removeprefix("data: ")
                out.append(data if data == "[DONE]" else json.loads(data))
    return out


# ---- numerics on the real engine ------------------------------------------------------------
def test_echo_scores_the_prompt_like_moerun_score(real, scored):
    base, _ = real
    tokens = load_tokenizer().encode_ordinary(TEXT)
    out = post(base, {"prompt": TEXT, "echo": True, "logprobs": 3, "max_tokens": 0}).json()
    assert out["object"] == "text_completion" and out["id"].startswith("cmpl-")
    (choice,) = out["choices"]
    assert choice["text"] == TEXT and choice["finish_reason"] == "length"
    lp = choice["logprobs"]
    assert set(lp) == {"tokens", "token_logprobs", "top_logprobs", "text_offset"}
    assert close(lp["token_logprobs"], scored(tokens))
    assert len(lp["tokens"]) == len(tokens) and lp["top_logprobs"][0] is None
    for i, top in enumerate(lp["top_logprobs"][1:], start=1):
        # the three most likely, and the actual token: 3 or 4 entries, most likely first
        assert 3 <= len(top) <= 4 and top[lp["tokens"][i]] == lp["token_logprobs"][i]
        assert max(top.values()) == list(top.values())[0] >= lp["token_logprobs"][i]
    # offsets index the text: each token's characters start there
    offsets = lp["text_offset"]
    assert offsets[0] == 0 and offsets == sorted(offsets)
    assert TEXT[offsets[1] : offsets[2]] == lp["tokens"][1]
    assert out["usage"] == {"prompt_tokens": len(tokens), "completion_tokens": 0,
                            "total_tokens": len(tokens)}  # fmt: skip


def test_lm_eval_harness_requests(real, scored):
    """What lm-eval's local-completions model sends to score: token id prompts in a batch,
    echo, logprobs 1, temperature 0, max_tokens 1 (older) or 0."""
    base, _ = real
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 199_000, (n,), generator=g).tolist() for n in (9, 40)]
    client = openai.OpenAI(base_url=base, api_key="x", max_retries=0)
    for max_tokens in (1, 0):
        out = client.completions.create(
            model="tiny-oss", prompt=prompts, echo=True, logprobs=1, max_tokens=max_tokens,
            temperature=0, seed=1234,
        )  # fmt: skip
        assert [c.index for c in out.choices] == [0, 1]
        for choice, prompt in zip(out.choices, prompts, strict=True):
            lps = choice.logprobs.token_logprobs
            assert len(lps) == len(prompt) + max_tokens
            assert close(lps[: len(prompt)], scored(prompt))
            if max_tokens:  # the greedy token is the top one
                assert lps[-1] == max(choice.logprobs.top_logprobs[-1].values())
        assert out.usage.prompt_tokens == sum(map(len, prompts))
        assert out.usage.completion_tokens == 2 * max_tokens


async def _engine_tokens(engine: AsyncEngine, prompt: list[int], params: SamplingParams):
    ids, reason = [], None
    async for delta in engine.generate(prompt, params, f"oracle-{random.random()}"):
        ids, reason = ids + delta.token_ids, delta.finish_reason
    return ids, reason


def test_generated_text_is_the_engines_tokens_and_streams_the_same(real):
    base, state = real
    tok = load_tokenizer()
    prompt = tok.encode_ordinary("Once upon a time")
    params = SamplingParams(temperature=0, max_tokens=8)
    ids, reason = asyncio.run(_engine_tokens(state.engine, prompt, params))
    if reason == "stop":
        ids = ids[:-1]  # the stop token is not text
    expected = b"".join(tok.decode_single_token_bytes(t) for t in ids).decode("utf-8", "replace")
    body = {"prompt": "Once upon a time", "max_tokens": 8, "temperature": 0, "logprobs": 2}
    whole = post(base, body).json()
    choice = whole["choices"][0]
    assert choice["text"] == expected and choice["finish_reason"] == reason
    assert len(choice["logprobs"]["tokens"]) == whole["usage"]["completion_tokens"] == 8
    assert choice["logprobs"]["text_offset"][0] == 0  # offsets into the completion's text
    events = sse(base, {**body, "stream": True, "stream_options": {"include_usage": True}})
    assert events[-1] == "[DONE]" and events[-2]["choices"] == []
    assert events[-2]["usage"] == whole["usage"]
    chunks = [c["choices"][0] for c in events[:-2]]
    assert "".join(c["text"] for c in chunks) == expected
    assert [c["finish_reason"] for c in chunks] == [None] * (len(chunks) - 1) + [reason]
    streamed = [t for c in chunks if c["logprobs"] for t in c["logprobs"]["tokens"]]
    assert streamed == choice["logprobs"]["tokens"]
    # echo in a stream: the prompt comes first, with its logprobs
    echoed = sse(base, {**body, "echo": True, "stream": True})
    first = echoed[0]["choices"][0]
    assert first["text"].startswith("Once upon a time")
    assert first["logprobs"]["token_logprobs"][0] is None
    assert "".join(c["choices"][0]["text"] for c in echoed[:-1]) == "Once upon a time" + expected


def test_n_choices_per_prompt_and_seeds(real):
    base, state = real
    body = {"prompt": ["Hello", "Goodbye"], "n": 2, "max_tokens": 4, "seed": 5}
    out = post(base, body).json()
    assert [c["index"] for c in out["choices"]] == [0, 1, 2, 3]
    assert out["usage"]["completion_tokens"] == 16
    assert post(base, body).json()["choices"] == out["choices"]  # seeded: reproducible
    label = {"endpoint": "completions", "finish_reason": "length"}
    assert state.metrics.registry.get_sample_value("moerun_requests_total", label) >= 8


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"prompt": "Hi", "max_tokens": 0}, "max_tokens"),  # nothing to return
        ({"prompt": "Hi", "logprobs": 21}, "logprobs"),
        ({"prompt": "Hi", "max_tokens": -1}, "max_tokens"),
        ({"prompt": ""}, "prompt"),
        ({"prompt": []}, "prompt"),
        ({"prompt": ["a", ""]}, "prompt"),
        ({"prompt": "Hi", "n": 0}, "n"),
        ({"prompt": "Hi", "stop": ["a"] * 5}, "stop"),
        ({"prompt": [1, "a"]}, None),
        ({"prompt": [10**7]}, None),
        ({"prompt": "Hi", "max_tokens": MAX_LEN}, "prompt"),
        ({"prompt": "word " * MAX_LEN}, "prompt"),
    ],
)
def test_bad_requests(real, body, param):
    err = check_error(post(real[0], body), 400)
    if param:
        assert err["param"] == param


def test_unknown_model(real):
    check_error(post(real[0], {"prompt": "Hi", "model": "gpt-5"}), 404)


def test_kv_blocks_are_reported_before_the_first_request(folder):
    llm = LLMEngine(_cfg(folder))
    metrics = Metrics()
    metrics.render(AsyncEngine(llm))
    total = metrics.registry.get_sample_value("moerun_kv_blocks_total")
    assert total == llm.stats().kv_blocks_total > 0


# ---- text handling on a scripted source -----------------------------------------------------
@pytest.fixture(scope="module")
def scripted():
    script = harmony_tokens("Hello", " ", "<|channel|>", " world. Bye", "<|return|>")
    state = ServerState(ScriptedEngine([script]), "tiny-oss")
    with running_server(state) as base:
        yield base


def test_stop_token_and_stop_strings(scripted):
    whole = post(scripted, {"prompt": "x", "max_tokens": 50}).json()["choices"][0]
    # special tokens inside the text stay; the stop token that ends it is not text
    assert whole["text"] == "Hello <|channel|> world. Bye" and whole["finish_reason"] == "stop"
    cut = post(scripted, {"prompt": "x", "stop": [". B"], "logprobs": 0}).json()["choices"][0]
    assert cut["text"] == "Hello <|channel|> world" and cut["finish_reason"] == "stop"
    events = sse(scripted, {"prompt": "x", "stop": "world", "stream": True})
    chunks = [e["choices"][0] for e in events[:-1]]
    assert "".join(c["text"] for c in chunks) == "Hello <|channel|> "
    assert chunks[-1]["finish_reason"] == "stop"
    echoed = post(scripted, {"prompt": "Say: ", "echo": True, "max_tokens": 1}).json()
    assert echoed["choices"][0]["text"] == "Say: Hello"
