"""Tensor and expert parallelism over torch.distributed (gloo, ranks as processes on this CPU):
the float32 log-probabilities of `score` equal the single-process result and both oracles
(transformers on the HF layout, OpenAI's reference on original/) within 1e-4, for TP, EP and
TP+EP, 2 and 4 ranks, both layouts; each rank holds only its share of the weights."""

import json
import subprocess
import sys

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
