"""Shared fixtures: random-weight checkpoints in the real on-disk layouts, written once per run."""

import os
from pathlib import Path

import pytest

# openai-harmony / tiktoken read o200k_base.tiktoken from here, never from the network; the
# package ships the same file (sha256-checked), so a clone without ../shared works too.
_SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
_PACKAGED = Path(__file__).resolve().parents[1] / "moerun" / "data"
os.environ.setdefault("TIKTOKEN_ENCODINGS_BASE", str(_SHARED if _SHARED.is_dir() else _PACKAGED))

from moerun.model.config import ModelConfig  # noqa: E402
from moerun.model.synth import synth  # noqa: E402

# Small but complete: every feature of the real model at a size that runs in milliseconds.
SMALL = ModelConfig(
    num_hidden_layers=2, num_experts=4, experts_per_token=2, vocab_size=512, hidden_size=64,
    intermediate_size=64, head_dim=16, num_attention_heads=4, num_key_value_heads=2,
    sliding_window=8,
)  # fmt: skip


@pytest.fixture(scope="session")
def make_checkpoint(tmp_path_factory):
    """make_checkpoint(cfg, layout="both", seed=0, **kw) -> folder; cached per arguments."""
    made: dict[tuple, Path] = {}

    def make(cfg: ModelConfig = SMALL, layout: str = "both", seed: int = 0, **kw) -> Path:
        key = (cfg, layout, seed, tuple(sorted(kw.items())))
        if key not in made:
            out = tmp_path_factory.mktemp("ckpt")
            made[key] = synth(cfg, out, layout=layout, seed=seed, **kw)
        return made[key]

    return make
