"""Prefix caching through the server with the real engine and the `openai` client: later chat
turns and responses report the prompt tokens they reused; other cache salts reuse nothing."""

import httpx2 as httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families
from server_utils import running_server

from moerun.config import EngineConfig
from moerun.engine.llm_engine import LLMEngine
from moerun.server.engine_client import AsyncEngine
from moerun.server.state import ServerState

from conftest import SMALL

BS = 8


@pytest.fixture(scope="module")
def base(make_checkpoint):
    folder = make_checkpoint(SMALL.replace(vocab_size=201088), layout="hf")
    cfg = EngineConfig(str(folder), dtype="float32", max_model_len=1024, kv_cache_memory="4MiB",
                       block_size=BS)  # fmt: skip
    with running_server(ServerState(AsyncEngine(LLMEngine(cfg)), "tiny-oss")) as url:
        yield url


def _client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url, api_key="none", max_retries=0)


def _cached(client: openai.OpenAI, messages: list, salt: str, max_tokens: int = 2):
    """(prompt tokens the prefix cache served, the completion)."""
    r = client.chat.completions.create(
        model="tiny-oss",
        messages=messages,
        max_tokens=max_tokens,
        temperature=0,
        extra_body={"cache_salt": salt},
    )
    return r.usage.prompt_tokens_details.cached_tokens, r


def test_chat_turns_reuse_the_previous_prompt_and_salts_isolate(base):
    client = _client(base)
    long = " ".join(f"word{i}" for i in range(60))  # a prompt of well over ten blocks
    messages = [{"role": "user", "content": f"Summarize: {long}"}]
    previous_prompt = 0
    for turn in range(3):
        cached, r = _cached(client, messages, "alice", max_tokens=6)
        if turn == 0:
            assert cached == 0
        else:  # the whole previous prompt but its last partial block
            assert cached >= 0.9 * previous_prompt, (turn, cached, previous_prompt)
        previous_prompt = r.usage.prompt_tokens
        messages += [{"role": "assistant", "content": r.choices[0].message.content or "ok"},
                     {"role": "user", "content": f"And turn {turn}?"}]  # fmt: skip
    assert _cached(client, messages, "bob")[0] == 0  # another tenant: nothing shared
    cached, again = _cached(client, messages, "bob")
    assert cached >= 0.9 * again.usage.prompt_tokens
    text = httpx.get(base.removesuffix("/v1") + "/metrics").text
    values = {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples}
    assert values["moerun_prefix_cache_hits_tokens"] > 0
    assert values["moerun_prefix_cache_queries_tokens"] > values["moerun_prefix_cache_hits_tokens"]


def test_responses_report_cached_input_tokens(base):
    client = _client(base)
    text = "Explain: " + " ".join(f"item{i}" for i in range(50))
    first = client.responses.create(model="tiny-oss", input=text, max_output_tokens=4,
                                    temperature=0, store=True)  # fmt: skip
    follow = client.responses.create(model="tiny-oss", input="More?", max_output_tokens=4,
                                     temperature=0, previous_response_id=first.id)  # fmt: skip
    assert first.usage.input_tokens_details.cached_tokens == 0
    assert follow.usage.input_tokens_details.cached_tokens >= 0.9 * first.usage.input_tokens


WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}  # fmt: skip


def test_tool_call_loop_reuses_every_earlier_turn(base):
    """An agent loop: the call and its result are appended to the conversation and the whole
    of it is sent again; each request reuses at least 90% of the one before it."""
    client = _client(base)
    days = " ".join(f"day{i}" for i in range(40))
    messages = [{"role": "user", "content": f"Weather in Paris on {days}?"}]

    def ask() -> tuple[int, int]:
        r = client.chat.completions.create(model="tiny-oss", messages=messages, max_tokens=3,
                                           temperature=0, tools=[WEATHER_TOOL])  # fmt: skip
        return r.usage.prompt_tokens_details.cached_tokens, r.usage.prompt_tokens

    cached, previous = ask()
    assert cached == 0
    for i in range(3):
        call = {
            "id": f"call_{i}",
            "type": "function",
            "function": {"name": "get_weather", "arguments": f'{{"city": "Paris{i}"}}'},
        }
        messages += [
            {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "tool_call_id": f"call_{i}", "content": f"{20 + i} C"},
        ]
        cached, prompt = ask()
        assert cached >= 0.9 * previous, (i, cached, previous)
        previous = prompt
