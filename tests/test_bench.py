"""`moerun bench`: the roofline's byte count derived independently, and a real run's report."""

import json
import subprocess
import sys

import pytest

from moerun.bench import decode_bytes_per_token
from moerun.model.checkpoint import expected_tensors
from moerun.model.config import PRESETS
from moerun.ops import cpu

from conftest import SMALL


def _from_checkpoint_shapes(name: str) -> int:
    """Bytes a batch-1 decode step reads, from the checkpoint's tensor list: everything except the
    experts and the embedding table, plus k/E of the expert tensors and one embedding row."""
    cfg = PRESETS[name]
    total = 0
    for ours, spec in expected_tensors(cfg, "original").items():
        if ours == "embedding.weight":
            total += spec.nbytes // cfg.vocab_size
        elif "mlp1" in ours or "mlp2" in ours:
            total += spec.nbytes * cfg.experts_per_token // cfg.num_experts
        else:
            total += spec.nbytes
    return total


def test_decode_bytes_match_the_checkpoint_shapes():
    for name in ("gpt-oss-20b", "gpt-oss-120b"):
        assert decode_bytes_per_token(PRESETS[name]) == _from_checkpoint_shapes(name)
    # the figure: ~3.7 GB per decoded token for 20b
    assert 3.6e9 < decode_bytes_per_token(PRESETS["gpt-oss-20b"]) < 3.8e9


def test_bench_runs_and_reports(make_checkpoint):
    folder = make_checkpoint(SMALL.replace(vocab_size=4096), "hf", seed=4)
    run = subprocess.run(
        [sys.executable, "-m", "moerun.cli", "bench", "--model", str(folder), "--prompt-len", "40",
         "--gen-len", "4", "--batch", "1,3", "--dtype", "float32", "--json"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout)
    assert [r["batch"] for r in report["results"]] == [1, 3]
    for r in report["results"]:
        assert r["ttft_s"] > 0 and r["decode_tok_s_total"] > 0
        assert (
            abs(r["decode_tok_s_total"] - 3 ** (r["batch"] == 3) * r["decode_tok_s_per_stream"])
            < 1e-6 * r["decode_tok_s_total"]
        )
    assert report["read_bandwidth_gbs"] > 0.5 and report["peak_rss_gib"] > 0
    assert report["decode_bytes_per_token"] == decode_bytes_per_token(
        SMALL.replace(vocab_size=4096)
    )
    assert "[bench] batch 3" in run.stderr  # progress while it runs
    if cpu.available():  # what ran, for the record
        assert report["cpu_kernels"].startswith(f"{cpu.variant()}, VNNI ")


def test_decode_bytes_per_step_counts_each_touched_expert_once():
    from moerun.bench import _expert_bytes, decode_bytes_per_step

    cfg = SMALL  # E = 4, k = 2, 2 layers (one sliding, window 8)
    one = decode_bytes_per_token(cfg)
    expert = _expert_bytes(cfg)
    dense = one - cfg.num_hidden_layers * 2 * expert
    assert decode_bytes_per_step(cfg, 1) == one
    # two tokens: an expert is missed by both with probability (1 - 2/4)^2 = 1/4 -> 3 touched
    assert decode_bytes_per_step(cfg, 2) == dense + cfg.num_hidden_layers * 3 * expert
    # many tokens read every expert once, not once per token
    assert decode_bytes_per_step(cfg, 10**6) == pytest.approx(dense + 2 * 4 * expert, rel=1e-9)
    # K/V: the full layer sees all 100 tokens, the sliding one its 8; 2 sequences, K and V, bf16
    kv = 2 * (100 + 8) * 2 * cfg.num_key_value_heads * cfg.head_dim * 2
    assert decode_bytes_per_step(cfg, 2, context=100) - decode_bytes_per_step(cfg, 2) == kv


def test_multi_turn_bench_reuses_the_first_turn(make_checkpoint):
    folder = make_checkpoint(SMALL.replace(vocab_size=4096), "hf", seed=4)
    run = subprocess.run(
        [sys.executable, "-m", "moerun.cli", "bench", "--model", str(folder), "--multi-turn", "50",
         "--new-tokens", "7", "--dtype", "float32", "--json"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout)
    assert len(report["reps"]) == 2
    for r in report["reps"]:
        assert r["turn2_cached_tokens"] == 50  # exactly turn 1's prompt
        assert r["turn1_ttft_s"] > 0 and r["turn2_ttft_s"] > 0 and r["alone_ttft_s"] > 0
