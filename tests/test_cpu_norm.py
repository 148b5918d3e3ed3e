"""The C RMSNorm (ops/cpu/norm.c) against the readable reference (moerun.ops.dense.rms_norm):
fp32 to a few ulps (the sum of squares is added in another order), bf16 to one rounding step,
each row the same bits alone or in a batch."""

import pytest
import torch

from moerun.ops import cpu
from moerun.ops.dense import rms_norm

pytestmark = pytest.mark.skipif(not cpu.available(), reason="CPU kernels unavailable")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n,D", [(1, 2880), (3, 64), (40, 100), (70, 17)])
def test_rms_norm_matches_reference(dtype, n, D):
    g = torch.Generator().manual_seed(n * D)
    x = (torch.randn(n, D, generator=g) * torch.rand(n, 1, generator=g) * 10).to(dtype)
    scale = torch.rand(D, generator=g) * 2
    got, want = cpu.rms_norm(x, scale, 1e-5), rms_norm(x, scale, 1e-5)
    assert got.dtype == dtype
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=4e-7 * 8, atol=1e-30)
    else:  # one bf16 step at most, and almost always the same value
        step = want.float().abs() * 2**-7
        assert ((got.float() - want.float()).abs() <= step).all()
        assert (got == want).float().mean() > 0.99
    alone = torch.cat([cpu.rms_norm(x[i : i + 1], scale, 1e-5) for i in range(n)])
    assert torch.equal(alone, got)


def test_rms_norm_special_rows():
    x = torch.zeros(3, 32)
    x[1, 3] = float("nan")
    x[2] = 1e30  # squares overflow to inf: the row normalizes to 0, like the reference
    scale = torch.ones(32)
    got, want = cpu.rms_norm(x, scale, 1e-5), rms_norm(x, scale, 1e-5)
    assert torch.equal(got[0], want[0]) and got[1].isnan().all() == want[1].isnan().all()
    assert torch.equal(got[2], want[2])
