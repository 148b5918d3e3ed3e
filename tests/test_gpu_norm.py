"""Triton RMSNorm (moerun.ops.gpu.norm) against the reference it replaces (moerun.ops.dense)."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported (see test_gpu_moe.py)
pytest.importorskip("triton")

from moerun.ops import dense  # noqa: E402
from moerun.ops.gpu.norm import rms_norm  # noqa: E402

from conftest import SMALL  # noqa: E402

GPU = torch.cuda.is_available()
DEV = "cuda" if GPU else "cpu"


@pytest.mark.parametrize("D", [64, 96, 2880])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_matches_module(D: int, dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(D)
    scale = (1 + 0.2 * torch.randn(D, generator=gen)).to(DEV)
    eps = SMALL.rms_norm_eps
    # rows from tiny to huge magnitudes, a zero row, a strided view (every other row)
    x = torch.randn(14, D, generator=gen) * torch.logspace(-6, 6, 14)[:, None]
    x[2] = 0  # row 1 of the strided view
    x = x.to(DEV, dtype)[::2]
    want = dense.rms_norm(x, scale, eps)  # the reference the model's RMSNorm runs
    got = rms_norm(x, scale, eps)
    assert got.dtype == dtype and got.shape == x.shape
    assert bool((got[1] == 0).all())
    if dtype == torch.float32:  # sum order only: a few ulp
        torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
    else:  # one rounding of values that agree to fp32 precision: equal, or 1 bf16 ulp apart
        ulp = want.float().abs() * 2**-7
        assert bool(((got.float() - want.float()).abs() <= ulp).all())
