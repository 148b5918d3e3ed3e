"""Reasoning budget (budget forcing): after N analysis tokens the engine forces the analysis
closed and the final channel open, then lets the model answer; a real random-weight model
through the real engine, and the state machine on hand-written harmony."""

import torch
from server_utils import harmony_tokens

from moerun import LLM, SamplingParams
from moerun.harmony.budget import ReasoningBudget, final_header
from moerun.harmony.parser import HarmonyParser, ReasoningDelta

from conftest import SMALL


def _reasoning_tokens(tokens: list[int]) -> int:
    parser, n = HarmonyParser(), 0
    for t in tokens:
        n += parser.body_kind == "reasoning"
        parser.feed(t)
    return n


def test_budget_counts_analysis_content_and_forces_the_final_header():
    budget = ReasoningBudget(3)
    head = harmony_tokens("<|channel|>", "analysis", "<|message|>")
    for t in head + harmony_tokens("one two three"):
        logits = torch.zeros(201088)
        budget.mask(logits)
        assert torch.isfinite(logits).all()  # nothing forced before the budget is spent
        budget.accept(t)
    forced = []
    for _ in range(len(final_header())):
        logits = torch.randn(201088)
        budget.mask(logits)
        (allowed,) = torch.isfinite(logits).nonzero().flatten().tolist()
        forced.append(allowed)
        budget.accept(allowed)
    assert forced == final_header()
    logits = torch.zeros(201088)
    budget.mask(logits)
    assert torch.isfinite(logits).all()  # the answer is free


def test_output_without_analysis_is_never_forced():
    budget = ReasoningBudget(0)
    for t in harmony_tokens("<|channel|>", "final", "<|message|>", "Hi there, friend."):
        logits = torch.zeros(201088)
        budget.mask(logits)
        assert torch.isfinite(logits).all()
        budget.accept(t)


def test_engine_stops_reasoning_at_the_budget(make_checkpoint):
    """A random model inside an analysis message (the prompt opened it) rambles on; with a
    budget of 5 its output holds exactly 5 reasoning tokens, then the final header, then free
    tokens; the same seed without a budget reasons for all max_tokens."""
    folder = make_checkpoint(SMALL.replace(vocab_size=201088), "hf", seed=3)
    llm = LLM(str(folder), dtype="float32", max_model_len=128, kv_cache_memory="8MiB")
    prompt = harmony_tokens("<|start|>", "user", "<|message|>", "Hi", "<|end|>", "<|start|>",
                            "assistant", "<|channel|>", "analysis", "<|message|>")  # fmt: skip
    head = harmony_tokens("<|channel|>", "analysis", "<|message|>")
    for seed in range(3):
        budget = lambda: ReasoningBudget(5, in_analysis=True)  # noqa: E731
        params = SamplingParams(temperature=1.0, seed=seed, max_tokens=20, ignore_eos=True,
                                constraint=budget)  # fmt: skip
        out = llm.generate([prompt], params)[0].token_ids
        assert out[5 : 5 + len(final_header())] == final_header()
        assert _reasoning_tokens(head + out) == 5 + 1  # 5 tokens, then the forced <|end|>
        free = llm.generate([prompt], SamplingParams(temperature=1.0, seed=seed, max_tokens=20,
                                                     ignore_eos=True))[0].token_ids  # fmt: skip
        assert free[:5] == out[:5]  # the same model and seed until the budget bites
    events = []
    parser = HarmonyParser()
    for t in head + out:
        events += parser.feed(t)
    assert any(isinstance(e, ReasoningDelta) for e in events)


def test_server_passes_the_budget_through_chat_and_responses():
    """Plumbing: the request field (and serve's default) reach the engine as a constraint; the
    scripted token source obeys it the way the engine's greedy path does."""
    import openai
    from server_utils import ScriptedEngine, running_server

    from moerun.server.state import ServerState

    long_thought = harmony_tokens("<|channel|>", "analysis", "<|message|>",
                                  " ".join(f"w{i}" for i in range(30)), "<|end|>", "<|start|>",
                                  "assistant", "<|channel|>", "final", "<|message|>", "Done.",
                                  "<|return|>")  # fmt: skip
    state = ServerState(ScriptedEngine([long_thought]), "scripted-oss", max_reasoning_tokens=200)
    with running_server(state) as base:
        client = openai.OpenAI(base_url=base, api_key="none", max_retries=0)
        msgs = [{"role": "user", "content": "Think"}]
        capped = client.chat.completions.create(model="scripted-oss", messages=msgs,
                                                extra_body={"max_reasoning_tokens": 4})  # fmt: skip
        assert capped.usage.completion_tokens_details.reasoning_tokens == 4 + 1  # + <|end|>
        reasoning = capped.choices[0].message.model_extra["reasoning_content"]
        assert len(reasoning.split()) <= 4 and capped.choices[0].message.content
        default = client.chat.completions.create(model="scripted-oss", messages=msgs)
        assert default.choices[0].message.content == "Done."  # 200 is more than it needs
        resp = client.responses.create(model="scripted-oss", input="Think",
                                       extra_body={"max_reasoning_tokens": 2})  # fmt: skip
        assert resp.usage.output_tokens_details.reasoning_tokens == 2 + 1
