"""`moerun score` and `moerun synth` end to end, checked against the reference model and harmony."""

import json
import math
import subprocess
import sys

import pytest
import torch

from moerun.model.checkpoint import load_checkpoint

from conftest import SMALL
from oracles import hf_logprobs, reference_logprobs

# full vocabulary so real text tokenizes; small everywhere else
TEXT_CFG = SMALL.replace(vocab_size=201088)
TEXT = (
    "MXFP4 keeps 32 four-bit values per block with one shared power-of-two scale. "
    "Text that spells <|start|> or <|return|> is plain text here, never a control token. "
) * 6  # > 256 tokens: crosses the scorer's logit chunking


def _moerun(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "moerun.cli", *args], capture_output=True, text=True
    )


def _harmony_tokens(text: str) -> list[int]:
    from openai_harmony import HarmonyEncodingName, load_harmony_encoding

    enc = load_harmony_encoding(HarmonyEncodingName.HARMONY_GPT_OSS)
    return enc.encode(text, disallowed_special=())


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_score_json_matches_reference(make_checkpoint, dtype):
    folder = make_checkpoint(SMALL, "both", seed=2)
    tokens = torch.randint(0, SMALL.vocab_size, (30,), generator=torch.Generator().manual_seed(5))
    # the reference ops, which follow the reference's bf16 op graph to the bit
    run = _moerun("score", "--model", str(folder / "original"), "--tokens",
                  ",".join(map(str, tokens.tolist())), "--dtype", dtype, "--json",
                  "--kernels", "torch")  # fmt: skip
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout)
    assert set(out) == {"tokens", "logprobs", "perplexity"}
    assert out["tokens"] == tokens.tolist()
    assert out["logprobs"][0] is None and len(out["logprobs"]) == len(tokens)
    ref = reference_logprobs(folder / "original", tokens, getattr(torch, dtype))
    expected = ref[:-1].gather(1, tokens[1:, None]).squeeze(1)  # position i predicts token i+1
    tol = 1e-4 if dtype == "float32" else 0.05
    assert torch.allclose(torch.tensor(out["logprobs"][1:]), expected, atol=tol, rtol=0)
    assert out["perplexity"] == pytest.approx(math.exp(-expected.mean().item()), rel=1e-3)


def test_score_text_file_uses_harmony_tokens(make_checkpoint, tmp_path):
    folder = make_checkpoint(TEXT_CFG, "hf", seed=2)
    path = tmp_path / "text.txt"
    path.write_text(TEXT, encoding="utf-8")
    run = _moerun("score", "--model", str(folder), "--text-file", str(path), "--json",
                  "--dtype", "float32")  # fmt: skip
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout)
    expected_tokens = _harmony_tokens(TEXT)
    assert len(expected_tokens) > 256
    assert out["tokens"] == expected_tokens
    assert 200006 not in out["tokens"] and 200002 not in out["tokens"]  # spelled, not special
    ids = torch.tensor(expected_tokens)
    expected = hf_logprobs(folder, ids)[:-1].gather(1, ids[1:, None]).squeeze(1)
    assert torch.allclose(torch.tensor(out["logprobs"][1:]), expected, atol=1e-4, rtol=0)


def test_score_plain_output_reports_perplexity(make_checkpoint):
    folder = make_checkpoint(SMALL, "hf", seed=2)
    run = _moerun("score", "--model", str(folder), "--tokens", "1,2,3,4")
    assert run.returncode == 0, run.stderr
    assert "perplexity:" in run.stdout and "tokens: 4" in run.stdout


def test_synth_cli_overrides_and_is_deterministic(tmp_path):
    args = ["--preset", "tiny", "--layers", "3", "--experts", "4", "--layout", "original"]
    for name, seed in (("a", "5"), ("b", "5"), ("c", "6")):
        run = _moerun("synth", str(tmp_path / name), *args, "--seed", seed)
        assert run.returncode == 0, run.stderr
    a, b, c = (load_checkpoint(tmp_path / n) for n in "abc")
    assert a.layout == "original" and a.config.num_hidden_layers == 3 and a.config.num_experts == 4
    assert a.config.hidden_size == 128  # the tiny preset's
    for name in a.tensors:
        assert torch.equal(a.tensors[name], b.tensors[name]), name
    assert not torch.equal(a.tensors["block.2.attn.sinks"], c.tensors["block.2.attn.sinks"])
