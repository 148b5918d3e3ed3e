"""Structured outputs (llguidance over the whole harmony turn): a random-weight model, the worst
case (any token is likely), through the real server and the `openai` client. Every response that
ends with finish_reason "stop" parses and validates against its schema with `jsonschema`; bad
schemas are a 400 naming the problem; the grammar alone, on hand-written harmony."""

import json
import re

import jsonschema
import openai
import pytest
import torch
from server_utils import harmony_tokens, running_server

from moerun import LLM, SamplingParams, StructuredOutput
from moerun.config import EngineConfig
from moerun.engine.llm_engine import LLMEngine
from moerun.harmony.structured import GrammarConstraint, check_grammar, turn_grammar
from moerun.server.engine_client import AsyncEngine
from moerun.server.state import ServerState

from conftest import SMALL

SCHEMAS = [
    {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
     "additionalProperties": False},
    {"type": "object", "properties": {"unit": {"enum": ["c", "f"]},
                                      "n": {"type": "integer", "minimum": 0, "maximum": 99}},
     "required": ["unit", "n"], "additionalProperties": False},
    {"type": "object", "properties": {"tags": {"type": "array", "items": {"enum": ["a", "b"]},
                                               "maxItems": 3}},
     "required": ["tags"], "additionalProperties": False},
    {"type": "object", "properties": {"pick": {"anyOf": [{"type": "boolean"}, {"type": "null"}]}},
     "required": ["pick"], "additionalProperties": False},
]  # fmt: skip


@pytest.fixture(scope="module")
def base(make_checkpoint):
    folder = make_checkpoint(SMALL.replace(vocab_size=201088), layout="hf", seed=5)
    cfg = EngineConfig(str(folder), dtype="float32", max_model_len=1024, kv_cache_memory="8MiB")
    with running_server(ServerState(AsyncEngine(LLMEngine(cfg)), "tiny-oss")) as url:
        yield url


def test_grammar_walks_a_whole_turn_and_refuses_control_tokens_in_text():
    c = GrammarConstraint(turn_grammar(SCHEMAS[1]))
    turn = harmony_tokens("<|channel|>", "analysis", "<|message|>", "Think.", "<|end|>",
                          "<|start|>", "assistant", "<|channel|>", "final", "<|message|>",
                          '{"unit": "c", "n": 7}', "<|return|>")  # fmt: skip
    in_text = False  # inside the analysis text or the JSON: no control token may come
    for i, t in enumerate(turn):
        allowed = torch.from_numpy(c.allowed())
        assert allowed[t], i
        if in_text:
            assert not allowed[200006] and not allowed[200012] and not allowed[201087], i
        in_text = (in_text or t == 200008) and t not in (200007, 200002)
        c.accept(t)
    assert c.matcher.is_stopped()


@pytest.mark.parametrize("schema", SCHEMAS)
def test_chat_and_responses_answers_validate(base, schema):
    client = openai.OpenAI(base_url=base, api_key="none", max_retries=0)
    fmt = {"type": "json_schema", "json_schema": {"name": "r", "schema": schema, "strict": True}}
    stops = 0
    for seed in range(3):
        r = client.chat.completions.create(
            model="tiny-oss", messages=[{"role": "user", "content": "Answer."}], seed=seed,
            max_tokens=120, response_format=fmt, extra_body={"max_reasoning_tokens": 8},
        )  # fmt: skip
        choice = r.choices[0]
        assert r.usage.completion_tokens_details.reasoning_tokens <= 8 + 1
        if choice.finish_reason == "stop":
            stops += 1
            jsonschema.validate(json.loads(choice.message.content), schema)
    resp = client.responses.create(
        model="tiny-oss", input="Answer.", max_output_tokens=120,
        text={"format": {"type": "json_schema", "name": "r", "schema": schema, "strict": True}},
        extra_body={"max_reasoning_tokens": 8},
    )  # fmt: skip
    if resp.status == "completed":
        stops += 1
        jsonschema.validate(json.loads(resp.output_text), schema)
    assert stops >= 2  # the grammar steers even a random model to a finished answer


def test_json_object_and_bad_schemas(base):
    client = openai.OpenAI(base_url=base, api_key="none", max_retries=0)
    r = client.chat.completions.create(
        model="tiny-oss", messages=[{"role": "user", "content": "JSON"}], seed=1, max_tokens=150,
        response_format={"type": "json_object"}, extra_body={"max_reasoning_tokens": 4},
    )  # fmt: skip
    if r.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(r.choices[0].message.content), dict)
    for bad, why in (({"type": "strin"}, "strin"), ({"type": "integer", "minimum": 5,
                                                      "maximum": 3}, "minimum")):  # fmt: skip
        fmt = {"type": "json_schema", "json_schema": {"name": "r", "schema": bad}}
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(
                model="tiny-oss", messages=[{"role": "user", "content": "x"}], response_format=fmt
            )
        assert why in e.value.body["message"] and e.value.body["param"] == "response_format"
    with pytest.raises(ValueError, match="Unsatisfiable"):
        check_grammar(turn_grammar({"enum": []}))


def test_the_schema_is_shown_in_the_developer_message():
    """The harmony guide's `# Response Formats` section, after the instructions (spec §5.4)."""
    from moerun.harmony.render import ResponseFormat, render_prompt
    from moerun.harmony.tokenizer import load_tokenizer

    schema = SCHEMAS[0]
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    text = load_tokenizer().decode(render_prompt(msgs, [], response_format=ResponseFormat(
        "verdict", schema, "Whether it is ok.")))  # fmt: skip
    want = ('<|start|>developer<|message|># Instructions\n\nBe brief.\n\n# Response Formats\n\n'
            '## verdict\n\n// Whether it is ok.\n' + json.dumps(schema, separators=(",", ":"))
            + "<|end|>")  # fmt: skip
    assert want in text
    plain = load_tokenizer().decode(render_prompt(msgs[1:], [], response_format=ResponseFormat(
        "verdict", schema)))  # fmt: skip
    assert "<|start|>developer<|message|># Response Formats\n\n## verdict\n\n{" in plain


CITY = {"type": "object", "properties": {"city": {"enum": ["Paris", "Rome"]}},
        "required": ["city"], "additionalProperties": False}  # fmt: skip
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": CITY, "strict": True}},
    {"type": "function", "function": {"name": "get_time", "parameters": CITY, "strict": True}},
]


@pytest.mark.parametrize("choice", ["required", {"type": "function",
                                                 "function": {"name": "get_time"}}])  # fmt: skip
def test_forced_calls_name_declared_tools_with_valid_arguments(base, choice):
    """A random model forced to call (the worst case: before, 6 of 8 seeds named `functions.`):
    every finished call names a declared tool and its arguments validate; and the call sent back
    continues the conversation."""
    client = openai.OpenAI(base_url=base, api_key="none", max_retries=0)
    msgs = [{"role": "user", "content": "Weather?"}]
    finished = 0
    for seed in range(4):
        r = client.chat.completions.create(
            model="tiny-oss", messages=msgs, tools=TOOLS, tool_choice=choice, seed=seed,
            max_tokens=60,
        )  # fmt: skip
        if r.choices[0].finish_reason != "tool_calls":
            continue
        finished += 1
        [call] = r.choices[0].message.tool_calls
        assert call.function.name in {"get_weather", "get_time"}
        if choice != "required":
            assert call.function.name == "get_time"
        jsonschema.validate(json.loads(call.function.arguments), CITY)
        back = msgs + [{"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
                       {"role": "tool", "tool_call_id": call.id, "content": "sunny"}]  # fmt: skip
        client.chat.completions.create(model="tiny-oss", messages=back, tools=TOOLS, max_tokens=2)
    assert finished >= 3


def test_streamed_equals_whole_for_a_seed(base):
    client = openai.OpenAI(base_url=base, api_key="none", max_retries=0)
    fmt = {"type": "json_schema", "json_schema": {"name": "r", "schema": SCHEMAS[1]}}
    msgs = [{"role": "user", "content": "Go."}]
    body = dict(model="tiny-oss", messages=msgs, seed=7, max_tokens=120, response_format=fmt,
                extra_body={"max_reasoning_tokens": 6})  # fmt: skip
    whole = client.chat.completions.create(**body)
    chunks = list(client.chat.completions.create(**body, stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == (whole.choices[0].message.content or "")
    reasons = [c.choices[0].finish_reason for c in chunks if c.choices]
    reasons = [r for r in reasons if r]
    assert reasons == [whole.choices[0].finish_reason]
    assert "<|" not in text  # no control token ever reaches content


@pytest.fixture(scope="module")
def llm(make_checkpoint):
    folder = make_checkpoint(SMALL.replace(vocab_size=201088), layout="hf", seed=5)
    return LLM(str(folder), dtype="float32", max_model_len=512, kv_cache_memory="8MiB")


def test_python_api_structured_output(llm):
    """SamplingParams(structured_output=...) on a raw completion: JSON schema and regex, on a
    random model; each finished output matches, ending at <|endoftext|>."""
    specs = [StructuredOutput(json=SCHEMAS[1]), StructuredOutput(regex=r"[a-z]{2,5}/[0-9]{3}"),
             StructuredOutput(grammar='start: "yes" | "no"')]  # fmt: skip
    params = [SamplingParams(max_tokens=80, seed=s, structured_output=spec)
              for spec in specs for s in range(3)]  # fmt: skip
    outs = llm.generate(["Answer:"] * len(params), params)
    finished = 0
    for p, out in zip(params, outs, strict=True):
        if out.finish_reason != "stop":
            continue
        finished += 1
        assert out.token_ids[-1] == 199999
        text = llm.tokenizer.decode(out.token_ids[:-1])
        spec = p.structured_output
        if spec.json is not None:
            jsonschema.validate(json.loads(text), spec.json)
        elif spec.regex is not None:
            assert re.fullmatch(spec.regex, text), text
        else:
            assert text in ("yes", "no")
    assert finished >= 6
    with pytest.raises(ValueError, match="Unsatisfiable schema"):
        llm.generate("x", SamplingParams(structured_output=StructuredOutput(json={"enum": []})))
    with pytest.raises(ValueError, match="exactly one"):
        StructuredOutput(json=True, regex="a")


def test_auto_with_strict_tools_and_a_response_format(base):
    """tool_choice auto, strict tools and a response format at once, on a random model: each
    finished turn is either a call to a declared tool with valid arguments (finish_reason
    tool_calls) or a final answer that validates."""
    client = openai.OpenAI(base_url=base, api_key="none", max_retries=0)
    fmt = {"type": "json_schema", "json_schema": {"name": "r", "schema": SCHEMAS[0]}}
    kinds = []
    for seed in range(10):
        r = client.chat.completions.create(
            model="tiny-oss", messages=[{"role": "user", "content": "Weather?"}], tools=TOOLS,
            seed=seed, max_tokens=60, response_format=fmt, extra_body={"max_reasoning_tokens": 4},
        )  # fmt: skip
        choice = r.choices[0]
        kinds.append(choice.finish_reason)
        if choice.finish_reason == "tool_calls":
            for call in choice.message.tool_calls:
                assert call.function.name in {"get_weather", "get_time"}
                jsonschema.validate(json.loads(call.function.arguments), CITY)
        elif choice.finish_reason == "stop":
            jsonschema.validate(json.loads(choice.message.content), SCHEMAS[0])
    assert kinds.count("stop") + kinds.count("tool_calls") >= 6, kinds


def test_a_strict_tool_schema_llguidance_refuses_is_a_400(base):
    client = openai.OpenAI(base_url=base, api_key="none", max_retries=0)
    bad = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 5, "maximum": 3}},
           "required": ["n"]}  # fmt: skip
    tools = [{"type": "function", "function": {"name": "f", "parameters": bad, "strict": True}}]
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny-oss", tools=tools,
                                       messages=[{"role": "user", "content": "x"}])  # fmt: skip
    assert "'f'" in e.value.body["message"] and e.value.body["param"] == "tools"
