"""Tensor and expert parallelism over torch.distributed (gloo, ranks as processes on this CPU):
the float32 log-probabilities of `score` equal the single-process result and both oracles
(transformers on the HF layout, OpenAI's reference on original/) within 1e-4, for TP, EP and
TP+EP, 2 and 4 ranks, both layouts; each rank holds only its share of the weights."""

import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from moerun.errors import ConfigError
from moerun.parallel.launch import run_ranks
from moerun.parallel.shard import Shard
from moerun.parallel.tasks import score_rank

from conftest import SMALL
from oracles import hf_logprobs, moerun_logprobs, reference_logprobs

# 4 KV heads (so 4 ranks get one each), 8 experts, 2 MXFP4 groups of width 64 per expert
CFG = SMALL.replace(num_attention_heads=8, num_key_value_heads=4, num_experts=8,
                    intermediate_size=128)  # fmt: skip
TOKENS = [3, 17, 250, 9, 9, 400, 31, 77, 5, 128, 64, 2, 300, 11, 8, 199]  # past the window of 8
MODES = {"tp": (False, True), "ep": (True, False), "tp+ep": (True, True)}


@pytest.fixture(scope="module")
def folder(make_checkpoint):
    return make_checkpoint(CFG, layout="both", seed=3)


@pytest.fixture(scope="module")
def oracles(folder):
    t = torch.tensor(TOKENS)
    want = moerun_logprobs(folder, t, torch.float32)
    gathered = want[:-1].gather(1, t[1:, None])[:, 0]
    hf = hf_logprobs(folder, t)[:-1].gather(1, t[1:, None])[:, 0]
    ref = reference_logprobs(folder / "original", t, torch.float32)[:-1].gather(1, t[1:, None])
    return gathered, hf, ref[:, 0]


def _parallel(folder, layout: str, size: int, mode: str, kernels: str = "torch") -> dict:
    path = folder if layout == "hf" else folder / "original"
    ep, attn = MODES[mode]
    return run_ranks(size, score_rank, str(path), TOKENS, "float32", kernels, "cpu", ep, attn)


@pytest.mark.parametrize(("layout", "kernels"), [("hf", "torch"), ("original", "torch"),
                                                 ("hf", "cpu")])  # fmt: skip
@pytest.mark.parametrize("mode", list(MODES))
def test_two_ranks_equal_one_process_and_both_oracles(folder, oracles, layout, kernels, mode):
    got = torch.tensor(_parallel(folder, layout, 2, mode, kernels)["logprobs"][1:])
    for want in oracles:
        assert (got - want).abs().max() < 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("mode", list(MODES))
def test_four_ranks_equal_one_process(folder, oracles, mode):
    out = _parallel(folder, "hf", 4, mode)
    got = torch.tensor(out["logprobs"][1:])
    for want in oracles:
        assert (got - want).abs().max() < 1e-4


def test_each_rank_holds_its_share(folder):
    """EP over 4 ranks: each holds 2 of the 8 experts, a quarter of the packed bytes; TP: a
    quarter of each expert's width; the rest (embedding, norms, router) whole on every rank."""
    from moerun.model.checkpoint import load_checkpoint
    from moerun.model.gpt_oss import Transformer

    whole_packed, _ = Transformer.from_checkpoint(load_checkpoint(folder), torch.float32,
                                                  "torch").weight_bytes()  # fmt: skip
    for ep in (True, False):
        for rank in range(4):
            m = Transformer.from_checkpoint(load_checkpoint(folder), torch.float32, "torch",
                                            shard=Shard(rank, 4, expert_parallel=ep))  # fmt: skip
            packed, _ = m.weight_bytes()
            assert packed == whole_packed // 4, (ep, rank)


def test_a_split_the_model_cannot_take_is_refused():
    with pytest.raises(ConfigError, match="divide the 4 KV heads"):
        Shard(0, 3).check(CFG)
    with pytest.raises(ConfigError, match="divide the 8 experts"):
        Shard(0, 3, expert_parallel=True, attention_parallel=False).check(CFG)


def test_score_cli_with_two_ranks(folder):
    """`moerun score --tensor-parallel-size 2 --expert-parallel` spawns its rank and prints
    what one process prints."""
    tokens = ",".join(map(str, TOKENS))
    args = [sys.executable, "-m", "moerun.cli", "score", "--model", str(folder), "--tokens",
            tokens, "--dtype", "float32", "--kernels", "torch", "--json"]  # fmt: skip
    one = json.loads(subprocess.run(args, capture_output=True, text=True, check=True).stdout)
    two = subprocess.run(args + ["--tensor-parallel-size", "2", "--expert-parallel"],
                         capture_output=True, text=True, check=True)  # fmt: skip
    got = json.loads(two.stdout)
    assert got["tokens"] == one["tokens"]
    diff = max(abs(a - b) for a, b in zip(got["logprobs"][1:], one["logprobs"][1:], strict=True))
    assert diff < 1e-4


def test_llm_on_two_ranks_generates_what_one_process_does(folder):
    """The SPMD engine: greedy and seeded sampling over 2 ranks (TP, C kernels) give the same
    tokens as one process, with several requests batched and one aborted mid-way."""
    from moerun import LLM, SamplingParams

    prompts = [[3, 17, 250, 9], [9, 400, 31, 77, 5, 128], [64, 2]]
    params = [SamplingParams(temperature=0, max_tokens=12), SamplingParams(seed=5, max_tokens=12),
              SamplingParams(seed=6, max_tokens=12)]  # fmt: skip
    opts = dict(dtype="float32", max_model_len=64, kv_cache_memory="4MiB")
    want = [o.token_ids for o in LLM(str(folder), **opts).generate(prompts, params)]
    llm = LLM(str(folder), tensor_parallel_size=2, **opts)
    try:
        got = [o.token_ids for o in llm.generate(prompts, params)]
        stream = llm.stream([5, 6, 7], SamplingParams(seed=1, max_tokens=30))
        next(stream)
        stream.close()  # aborted on every rank; the next request still agrees
        again = llm.generate(prompts[:1], params[:1])[0].token_ids
    finally:
        llm.engine.close()
    assert got == want and again == want[0]


def _chat_all(base: str, prompts: list[str]) -> list[tuple[str | None, str]]:
    import openai

    client = openai.OpenAI(base_url=base, api_key="none", max_retries=0)

    def one(text: str) -> tuple[str | None, str]:
        r = client.chat.completions.create(model="m", messages=[{"role": "user", "content": text}],
                                           temperature=0, max_tokens=24)  # fmt: skip
        m = r.choices[0].message
        return m.content, (m.reasoning_content or "") + r.choices[0].finish_reason

    with ThreadPoolExecutor(len(prompts)) as pool:
        return list(pool.map(one, prompts))


def test_server_on_two_ranks_equals_one(make_checkpoint):
    """Through the real server: 8 concurrent greedy chats over 2 ranks (TP+EP) answer exactly as
    one process does, with a KV cache small enough to preempt; a stream closed early aborts on
    every rank and the server goes on."""
    import httpx
    from server_utils import running_server

    from moerun.config import EngineConfig
    from moerun.engine.llm_engine import LLMEngine
    from moerun.parallel.engine import ParallelEngine
    from moerun.server.engine_client import AsyncEngine
    from moerun.server.state import ServerState

    folder = make_checkpoint(CFG.replace(vocab_size=201088), layout="hf", seed=4)
    opts = dict(dtype="float32", max_model_len=320, kv_cache_memory="1MiB", max_num_seqs=8)
    prompts = [f"Question {i}: what is {i} + {i}? " * 14 for i in range(8)]
    with running_server(ServerState(AsyncEngine(LLMEngine(EngineConfig(str(folder), **opts))),
                                    "m")) as base:  # fmt: skip
        want = _chat_all(base, prompts)
    # a rank caches half the KV heads: half the bytes give it the same blocks, and 8 prompts of
    # ~170 tokens + 24 more do not fit in them at once, so the scheduler preempts
    opts["kv_cache_memory"] = "640KiB"
    cfg = EngineConfig(str(folder), tensor_parallel_size=2, expert_parallel=True, **opts)
    engine = ParallelEngine(cfg)
    try:
        with running_server(ServerState(AsyncEngine(engine), "m")) as base:
            assert _chat_all(base, prompts) == want
            assert engine.stats().num_preemptions > 0
            body = {"model": "m", "messages": [{"role": "user", "content": "Go"}],
                    "max_tokens": 200, "stream": True}  # fmt: skip
            with httpx.stream("POST", base + "/chat/completions", json=body) as r:
                next(r.iter_lines())  # the first chunk, then the client goes
            assert _chat_all(base, prompts[:2]) == want[:2]
    finally:
        engine.close()


@pytest.mark.slow
def test_torchrun_ranks_join_and_rank_0_prints(folder):
    """Multi-machine launch, on one machine: torchrun starts the ranks, they join its group."""
    base = ["score", "--model", str(folder), "--tokens", ",".join(map(str, TOKENS)),
            "--dtype", "float32", "--kernels", "torch", "--json"]  # fmt: skip
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2"]
    run = subprocess.run([*torchrun, "-m", "moerun.cli", *base], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-4000:]
    [line] = [x for x in run.stdout.splitlines() if x.startswith("{")]  # rank 0 alone prints
    one = subprocess.run([sys.executable, "-m", "moerun.cli", *base], capture_output=True,
                         text=True, check=True)  # fmt: skip
    got, want = json.loads(line)["logprobs"][1:], json.loads(one.stdout)["logprobs"][1:]
    assert max(abs(a - b) for a, b in zip(got, want, strict=True)) < 1e-4
