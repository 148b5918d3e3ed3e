"""Shared fixtures: random-weight checkpoints in the real on-disk layouts, written once per run."""

import os
from pathlib import Path

import pytest

# openai-harmony / tiktoken read o200k_base.tiktoken from here, never from the network; the
# package ships the same file (sha256-checked), so a clone without ../shared works too.
_SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
_PACKAGED = Path(__file__).resolve().parents[1] / "moerun" / "data"
os.environ.setdefault("TIKTOKEN_ENCODINGS_BASE", str(_SHARED if _SHARED.is_dir() else _PACKAGED))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from moerun.model.config import ModelConfig  # noqa: E402
from moerun.model.synth import synth  # noqa: E402


def _interpreter_rounds_bf16_like_a_gpu() -> None:
    """Triton's interpreter converts fp32 -> bf16 by truncating the mantissa (and its "rtne"
    rounds half up without carrying); a GPU rounds to nearest, ties to even. Truncation biases
    every bf16 value a kernel stores, so the interpreter's bf16 results drift from the GPU's.
    Route that one conversion through torch, which rounds as the GPU does."""
    try:
        import triton.language as tl
        from triton.runtime import interpreter
    except ImportError:
        return
    original = interpreter._convert_float
    rtz = interpreter._ir.ROUNDING_MODE.RTZ

    def convert(values, input_dtype, output_dtype, rounding_mode):
        if input_dtype == tl.float32 and output_dtype == tl.bfloat16 and rounding_mode != rtz:
            fp32 = torch.from_numpy(np.ascontiguousarray(values).view(np.float32))
            return fp32.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
        return original(values, input_dtype, output_dtype, rounding_mode)

    interpreter._convert_float = convert


if not torch.cuda.is_available():
    # Triton kernels run in the interpreter on CPU tensors; the switch must be set before the
    # kernels are defined (@triton.jit reads it), so test modules set it too
    os.environ.setdefault("TRITON_INTERPRET", "1")
    _interpreter_rounds_bf16_like_a_gpu()

# Small but complete: every feature of the real model at a size that runs in milliseconds.
SMALL = ModelConfig(
    num_hidden_layers=2, num_experts=4, experts_per_token=2, vocab_size=512, hidden_size=64,
    intermediate_size=64, head_dim=16, num_attention_heads=4, num_key_value_heads=2,
    sliding_window=8,
)  # fmt: skip


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--slow", action="store_true",
                     help="also run the tests marked slow (what .ci/run does)")  # fmt: skip


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked slow (Triton's interpreter, full-size shapes, long random-model sweeps)
    run only with --slow: the default suite stays a few minutes on 2 cores."""
    if config.getoption("--slow"):
        return
    skip = pytest.mark.skip(reason="slow: run with --slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


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
