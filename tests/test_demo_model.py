"""The packaged demo model (moerun/data/demo, scripts/train_demo.py): it expands to a real-format
checkpoint that moerun and transformers read alike, and through the real server it runs agent
tool loops (OpenAI Agents SDK, chat and responses models), structured outputs and the prefix
cache on conversations it never saw in training."""

import json
import random
import re

import jsonschema
import openai
import pytest
import torch
from server_utils import running_server

from moerun.config import EngineConfig
from moerun.demo import templates
from moerun.demo.conversations import heldout_turns, sample_turns
from moerun.demo.evaluate import evaluate
from moerun.demo.tools import TOOLS_BY_NAME
from moerun.demo.weights import DEMO_CONFIG, WEIGHTS, demo_path, packaged_dir
from moerun.engine.llm_engine import LLMEngine
from moerun.harmony.tokenizer import VOCAB_SIZE
from moerun.model.checkpoint import load_checkpoint
from moerun.server.engine_client import AsyncEngine
from moerun.server.state import ServerState

from oracles import harmony_encoding, hf_logprobs, moerun_logprobs

# what the shipped model reaches on held-out prompts, less a margin (README: "The demo model")
WELL_FORMED, CORRECT_CALLS, AGENT_LOOPS = 0.97, 0.8, 2


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MOERUN_CACHE", str(tmp_path_factory.mktemp("cache")))
        yield demo_path()


@pytest.fixture(scope="module")
def url(demo):
    cfg = EngineConfig(str(demo), max_model_len=2048, kv_cache_memory="64MiB")
    with running_server(ServerState(AsyncEngine(LLMEngine(cfg)), "demo")) as base:
        yield base


def _turns(kind: str, n: int) -> list:
    return [t for t in heldout_turns(60) if t.kind == kind][:n]


def test_package_is_small_and_expands_to_the_real_format(demo):
    assert (packaged_dir() / WEIGHTS).stat().st_size < 5 * 2**20
    ckpt = load_checkpoint(demo)
    assert ckpt.layout == "hf" and ckpt.config == DEMO_CONFIG
    assert ckpt.tensors["block.0.mlp.mlp1_weight.blocks"].dtype == torch.uint8  # MXFP4
    assert demo_path() == demo  # expanded once, then found by its hash


def test_moerun_and_transformers_agree_on_the_demo_weights(demo):
    turns = _turns("call", 1) + _turns("answer", 1)
    for turn in turns:
        tokens = torch.tensor(turn.prompt() + turn.completion())
        ours, theirs = moerun_logprobs(demo, tokens, torch.float32), hf_logprobs(demo, tokens)
        torch.testing.assert_close(ours, theirs, atol=2e-4, rtol=0)


def test_untrained_tokens_get_little_probability(demo):
    """Unused ids have zero unembedding rows (logit 0); where the model knows what comes next,
    the trained ids outscore all ~199k of them (median over the completions' positions)."""
    ckpt = load_checkpoint(demo)
    used = ckpt.tensors["unembedding.weight"].abs().sum(-1) > 0
    assert 1000 < int(used.sum()) < 5000 and len(used) == VOCAB_SIZE
    masses = []
    for turn in _turns("answer", 2) + _turns("call", 2):
        prompt, completion = turn.prompt(), turn.completion()
        logprobs = moerun_logprobs(demo, torch.tensor(prompt + completion), torch.float32)
        masses.append(logprobs[len(prompt) - 1 : -1, ~used].logsumexp(-1).exp())
    assert torch.cat(masses).median() < 1e-3, torch.cat(masses).median()


def test_training_completions_are_harmony():
    enc, rng = harmony_encoding(), random.Random(0)
    from openai_harmony import Role

    for _ in range(40):
        for turn in sample_turns(rng):
            messages = enc.parse_messages_from_completion_tokens(turn.completion(), Role.ASSISTANT)
            assert [m.channel for m in messages] == [
                "analysis",
                "commentary" if turn.call else "final",
            ]


def _pattern(phrasing: str) -> re.Pattern:
    """A phrasing with its {slots} as wildcards."""
    return re.compile(".+".join(map(re.escape, re.split(r"\{\w+\}", phrasing))))


def _bare(message: str) -> str:
    """A training request without the greeting before it or the thanks after it."""
    for prefix in templates.ASK_PREFIXES:
        message = message.removeprefix(prefix)
    for suffix in templates.ASK_SUFFIXES:
        message = message.removesuffix(suffix)
    return message


def test_training_never_shows_a_heldout_phrasing():
    """The evaluation's user phrasings (the last two of each list) are no training request."""
    lists = [t.asks for t in TOOLS_BY_NAME.values()] + [templates.CAPITAL_ASKS,
             templates.REPEAT_ASKS] + [talk[0] for talk in templates.SMALL_TALK]  # fmt: skip
    patterns = [_pattern(p) for asks in lists for p in asks[-2:]]
    seen, rng = set(), random.Random(1)
    for _ in range(3000):
        for turn in sample_turns(rng):
            seen |= {m["content"] for m in turn.messages if m["role"] == "user"}
    assert len(seen) > 1000
    # a request dressed with a greeting or thanks counts as its bare self too, and the words
    # around it are no held-out phrasing either (the filler "Hello. " once leaked a greeting)
    fillers = {f.strip() for f in templates.ASK_PREFIXES + templates.ASK_SUFFIXES}
    shown = seen | {_bare(m) for m in seen} | fillers
    leaks = [(m, p.pattern) for m in shown for p in patterns if p.fullmatch(m)]
    assert not leaks, leaks[:5]


def test_generated_turns_parse_with_openai_harmony(demo):
    """Every generated turn is harmony that openai-harmony parses: an analysis message, then a
    call to a declared function with JSON arguments, or a final answer."""
    from openai_harmony import Role

    from moerun import LLM, SamplingParams

    turns = _turns("call", 3) + _turns("answer", 3) + _turns("direct", 3)
    llm = LLM(str(demo), max_model_len=2048, kv_cache_memory="64MiB")
    outs = llm.generate([t.prompt() for t in turns], SamplingParams(temperature=0, max_tokens=300))
    for turn, out in zip(turns, outs, strict=True):
        messages = harmony_encoding().parse_messages_from_completion_tokens(
            out.token_ids, Role.ASSISTANT
        )
        assert messages[0].channel == "analysis"
        if messages[-1].recipient:
            declared = {f"functions.{t['function']['name']}" for t in turn.tools}
            assert messages[-1].recipient in declared
            json.loads(messages[-1].content[0].text)
        else:
            assert messages[-1].channel == "final"


@pytest.mark.slow
def test_heldout_rates(demo):
    """The README's numbers, on a smaller held-out sample (scripts/eval_demo.py: 300)."""
    from moerun import LLM

    llm = LLM(str(demo), max_model_len=2048, kv_cache_memory="256MiB")
    report = evaluate(llm, heldout_turns(60), temperature=0)
    assert report["well-formed harmony"]["rate"] >= WELL_FORMED, report
    assert report["correct tool name and arguments"]["rate"] >= CORRECT_CALLS, report
    assert report["high / low analysis length"] >= 1.5, report


def _agent_tools(calls: list):
    from agents import function_tool

    def record(name: str, args: dict) -> str:
        calls.append((name, args))
        return TOOLS_BY_NAME[name].run(args)

    @function_tool
    def get_weather(city: str) -> str:
        """Get the current weather for a city."""
        return record("get_weather", {"city": city})

    @function_tool
    def get_time(city: str) -> str:
        """Get the current local time in a city."""
        return record("get_time", {"city": city})

    @function_tool
    def calculate(expression: str) -> str:
        """Evaluate an arithmetic expression."""
        return record("calculate", {"expression": expression})

    @function_tool
    def convert_currency(amount: int, from_currency: str, to_currency: str) -> str:
        """Convert an amount of money from one currency to another."""
        args = {"amount": amount, "from_currency": from_currency, "to_currency": to_currency}
        return record("convert_currency", args)

    return [get_weather, get_time, calculate, convert_currency]


@pytest.mark.parametrize("api", ["chat", "responses"])
def test_agents_sdk_tool_loop_on_heldout_prompts(url, api):
    """Call -> the tool runs in the SDK -> an answer that contains its result, on held-out
    prompts; the model is tiny, so most loops (not every one) must get the arguments right."""
    agents = pytest.importorskip("agents")
    agents.set_tracing_disabled(True)
    client = openai.AsyncOpenAI(base_url=url, api_key="none", max_retries=0)
    if api == "chat":
        model = agents.OpenAIChatCompletionsModel(model="demo", openai_client=client)
    else:
        model = agents.OpenAIResponsesModel(model="demo", openai_client=client)
    tools = {"get_weather", "get_time", "calculate", "convert_currency"}
    turns = [t for t in _turns("call", 40) if t.call[0] in tools]
    turns = turns[:4] if api == "chat" else turns[4:8]
    completed = 0
    for turn in turns:
        calls: list = []
        agent = agents.Agent(
            name="assistant",
            instructions="You are a helpful assistant.",
            tools=_agent_tools(calls),
            model=model,
            model_settings=agents.ModelSettings(temperature=0),
        )
        result = agents.Runner.run_sync(agent, turn.messages[-1]["content"], max_turns=3)
        assert all(name in tools for name, _ in calls)  # only declared tools ever run
        result_text = TOOLS_BY_NAME[turn.call[0]].run(turn.call[1])
        completed += calls == [turn.call] and result_text in result.final_output
    assert completed >= AGENT_LOOPS, completed


def _client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url, api_key="none", max_retries=0)


def test_structured_output_follows_the_schema(url):
    schema = {"name": "capital_info", "schema": templates.CAPITAL_FORMAT, "strict": True}
    r = _client(url).chat.completions.create(
        model="demo",
        messages=[{"role": "user", "content": "Which city is the capital of Japan?"}],
        response_format={"type": "json_schema", "json_schema": schema},
        temperature=0,
        max_tokens=200,
    )
    answer = json.loads(r.choices[0].message.content)
    jsonschema.validate(answer, templates.CAPITAL_FORMAT)
    assert answer["capital"] == "Tokyo"


def test_prefix_cache_serves_the_agent_loop(url):
    """The tool-result turn reuses the call turn's prompt; a repeat reuses all but a block."""
    turn = _turns("call", 1)[0]
    tools = [t.openai() for t in TOOLS_BY_NAME.values()]
    messages = [{"role": "user", "content": turn.messages[-1]["content"]}]
    client = _client(url)

    def ask(msgs: list, choice: str = "auto"):
        return client.chat.completions.create(
            model="demo", messages=msgs, tools=tools, tool_choice=choice, temperature=0,
            max_tokens=200, extra_body={"cache_salt": "demo-prefix"},
        )  # fmt: skip

    first = ask(messages, "required")  # a call, whatever the model makes of the request
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    call = first.choices[0].message.tool_calls[0]
    result = TOOLS_BY_NAME[call.function.name].run(json.loads(call.function.arguments))
    messages += [first.choices[0].message.model_dump(exclude_none=True),
                 {"role": "tool", "tool_call_id": call.id, "content": result}]  # fmt: skip
    second = ask(messages)
    assert second.usage.prompt_tokens_details.cached_tokens >= first.usage.prompt_tokens - 16
    again = ask(messages)
    assert again.usage.prompt_tokens_details.cached_tokens >= second.usage.prompt_tokens - 16
    assert again.choices[0].message == second.choices[0].message
