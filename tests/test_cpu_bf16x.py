"""bf16 activations through the CPU's bf16 linear (`x_bf16=True`, what the model's bf16 mode
calls): the AVX-512 decode path (FMAs), the many-row FMA tiles and the many-row vdpbf16ps tiles
(AVX512-BF16) give the same bits, denormals flushed on every path, as vdpbf16ps does.
"""

import pytest
import torch

from moerun.ops import cpu

pytestmark = pytest.mark.skipif(
    "avx512" not in cpu.variants(), reason="the bf16-x paths are the avx512 variant's"
)
DOT = pytest.mark.skipif(not cpu.has_bf16dot(), reason="no exact AVX512-BF16 on this CPU")
SHAPES = [(37, 2880), (21, 2883), (3, 64), (50, 45), (16, 4096)]


def bf16_values(*shape: int, g: torch.Generator) -> torch.Tensor:
    """fp32 tensor holding bf16 values of mixed magnitudes, as bf16 activations do."""
    scale = torch.exp2(torch.randint(-8, 8, (shape[0], 1), generator=g).float())
    return (torch.randn(*shape, generator=g) * scale).bfloat16().float()


def operands(N: int, K: int, n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(N, K, generator=g) * 0.05).bfloat16()
    return bf16_values(n, K, g=g), w, torch.randn(N, generator=g).bfloat16(), g


@pytest.mark.parametrize(("N", "K"), SHAPES)
@pytest.mark.parametrize("dot", [False, pytest.param(True, marks=DOT), None])
def test_every_row_is_the_row_alone(N: int, K: int, dot: bool | None) -> None:
    """Rows computed one at a time (decode path) equal the same rows in batches of 5..70
    (tiles), bit for bit, and lie within fp32 rounding of the float64 product."""
    x, w, bias, _ = operands(N, K, 70, seed=N + K)
    alone = torch.cat([cpu.bf16_linear(x[i : i + 1], w, bias, x_bf16=True) for i in range(70)])
    for n in (5, 13, 70):
        assert torch.equal(cpu.bf16_linear(x[:n], w, bias, x_bf16=True, dot=dot), alone[:n])
    ref = x.double() @ w.double().T + bias.double()
    tol = 3e-5 * (x.double().abs() @ w.double().abs().T + bias.double().abs())
    assert ((alone.double() - ref).abs() <= tol).all()


@DOT
@pytest.mark.parametrize(("N", "K"), SHAPES)
def test_vdpbf16ps_tiles_equal_the_fma_tiles(N: int, K: int) -> None:
    """Also with cancelling sums and extreme exponents: one rounding per product pair, in the
    same order, whatever the magnitudes."""
    x, w, bias, g = operands(N, K, 33, seed=3 * N + K)
    x[::3] *= 2.0**100
    w[::2] = (w[::2].float() * 2.0**-90).bfloat16()
    x[1::4, : K // 2] = -x[1::4, K // 2 : 2 * (K // 2)]  # halves that cancel
    fma = cpu.bf16_linear(x, w, bias, x_bf16=True, dot=False)
    assert torch.equal(cpu.bf16_linear(x, w, bias, x_bf16=True, dot=True), fma)
    assert not cpu.uses_bf16dot() or torch.equal(cpu.bf16_linear(x, w, bias, x_bf16=True), fma)


@pytest.mark.parametrize("dot", [False, pytest.param(True, marks=DOT)])
@pytest.mark.parametrize("n", [1, 8])
def test_denormals_are_flushed_for_bf16_x(n: int, dot: bool) -> None:
    """Hand-derived: 2**-70 * 2**-70 = 2**-140 is an fp32 denormal; flushed, each product is 0
    (fp32 x keeps it: K * 2**-140). A denormal x value (2**-130) is read as 0 even where its
    product (2**-130 * 2**100) would be normal."""
    K, N = 64, 4
    x = torch.full((n, K), 2.0**-70)
    w = torch.full((N, K), 2.0**-70, dtype=torch.bfloat16)
    flushed = cpu.bf16_linear(x, w, None, x_bf16=True, dot=dot)
    assert torch.equal(flushed, torch.zeros(n, N))
    assert torch.equal(cpu.bf16_linear(x, w, None), torch.full((n, N), K * 2.0**-140))
    x = torch.full((n, K), 2.0**-130)  # a bf16 denormal
    w = torch.full((N, K), 2.0**100, dtype=torch.bfloat16)
    assert torch.equal(cpu.bf16_linear(x, w, None, x_bf16=True, dot=dot), torch.zeros(n, N))
    assert torch.equal(cpu.bf16_linear(x, w, None), torch.full((n, N), K * 2.0**-30))
