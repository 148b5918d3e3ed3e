"""CPU kernels (moerun.ops.cpu) against readable float64 references, every variant; and their
batch invariance: a row computed alone is bitwise the same row computed among others.

Tolerance: fp32 summation of terms in any order errs by at most (d - 1) * 2**-24 * sum|terms|
for a summation depth d; every kernel sums each output in at most ~400 sequential additions
(per-lane and per-block partial sums, K <= 2883), so 3e-5 * (sum|x*w| + |bias|) bounds the error.
Roundings in the fp32 subnormal range add up to 2**-150 each, whatever the magnitudes: K * 2**-149.
"""

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from subprocess import PIPE

import pytest
import torch

from moerun.ops import cpu
from moerun.ops.moe import SWIGLU_ALPHA, ExpertWeights, moe_experts
from moerun.ops.mxfp4 import dequantize

pytestmark = pytest.mark.skipif(
    not cpu.available(), reason="moerun's CPU kernels could not be built (no working C compiler)"
)
VARIANTS = [
    pytest.param(v, marks=pytest.mark.skipif(v not in cpu.variants(), reason=f"CPU lacks {v}"))
    for v in ("avx512", "avx2", "scalar")
]
REL = 3e-5
SUBNORMAL = 2.0**-149


def assert_close(
    y: torch.Tensor, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None
) -> None:
    """y [n, N] fp32 vs x @ w.T + bias in float64; w [N, K] holds the exact weight values."""
    x64, w64 = x.double(), w.double()
    b64 = torch.zeros(w.shape[0], dtype=torch.float64) if bias is None else bias.double()
    ref = x64 @ w64.T + b64
    tol = REL * (x64.abs() @ w64.abs().T + b64.abs()) + w.shape[1] * SUBNORMAL
    assert y.dtype == torch.float32 and y.shape == ref.shape
    err = (y.double() - ref).abs()
    bad = err > tol
    assert not bad.any(), f"errors {err[bad][:4].tolist()} > tolerances {tol[bad][:4].tolist()}"


def random_mxfp4(
    N: int, K: int, seed: int, lo: int = 112, hi: int = 140
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Generator]:
    """(blocks [N, G, 16], scales [N, G] in [lo, hi), an fp32 bias [N], the generator)."""
    g = torch.Generator().manual_seed(seed)
    blocks = torch.randint(0, 256, (N, K // 32, 16), dtype=torch.uint8, generator=g)
    scales = torch.randint(lo, hi, (N, K // 32), dtype=torch.uint8, generator=g)
    return blocks, scales, torch.randn(N, generator=g), g


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("n", [0, 1, 2, 5, 17])
@pytest.mark.parametrize("K", [32, 64, 2880])
@pytest.mark.parametrize("N", [1, 3, 33, 257])
def test_mxfp4_linear_matches_dequantize(N: int, K: int, n: int, variant: str) -> None:
    blocks, scales, _, g = random_mxfp4(N, K, seed=N * K + n)
    x = torch.randn(n, K, generator=g)
    y = cpu.mxfp4_linear(x, blocks, scales, variant=variant)
    assert_close(y, x, dequantize(blocks, scales, torch.float32), None)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("bias_dtype", [None, torch.bfloat16, torch.float32])
def test_mxfp4_linear_bias(bias_dtype: torch.dtype | None, variant: str) -> None:
    blocks, scales, bias, g = random_mxfp4(37, 96, seed=1, lo=0, hi=200)  # wide scale range
    bias = None if bias_dtype is None else (bias * 100).to(bias_dtype)
    x = torch.randn(9, 96, generator=g)
    y = cpu.mxfp4_linear(x, blocks, scales, bias, variant=variant)
    assert_close(y, x, dequantize(blocks, scales, torch.float32), bias)


@pytest.mark.parametrize("variant", VARIANTS)
def test_mxfp4_every_code_and_edge_scale_exact(variant: str) -> None:
    """One-hot rows of x read single weights: every code in both nibble positions, under scale
    bytes 0 and 1 (subnormal fp32 results), 126..128 and 200, must come back bit for bit."""
    scale_bytes = [0, 1, 126, 127, 128, 200]
    G = len(scale_bytes)
    j = torch.arange(16, dtype=torch.uint8)
    block = j | ((15 - j) << 4)  # byte j: low nibble j, high nibble 15 - j
    blocks = block.repeat(len(scale_bytes), G, 1)  # [N, G, 16]
    scales = torch.tensor(scale_bytes, dtype=torch.uint8)
    scales = torch.stack([scales.roll(i) for i in range(len(scale_bytes))])  # [N, G]
    w = dequantize(blocks, scales, torch.float32)  # [N, K]
    x = torch.eye(32 * G)
    y = cpu.mxfp4_linear(x, blocks, scales, variant=variant)
    assert torch.equal(y.T, w)
    assert (w[w != 0].abs().min() == 2.0**-128) and torch.isfinite(w).all()
    x = torch.randn(4, 32 * G, generator=torch.Generator().manual_seed(0))
    assert_close(cpu.mxfp4_linear(x, blocks, scales, variant=variant), x, w, None)


VNNI = pytest.mark.skipif(
    "avx512" not in cpu.variants() or not cpu.has_vnni(), reason="CPU lacks AVX-512 VNNI"
)


@VNNI
@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 17])
@pytest.mark.parametrize("K", [32, 160, 2880])
def test_quantized_decode_within_its_bound(K: int, n: int) -> None:
    """quantize_x rounds x to s * q per 32-block, s = absmax / 32512: each product is off by at
    most |w| * s / 2, so |y - exact| <= (|W| @ s/2) plus fp32 rounding. K = 160 ends in a
    partial 4-block chunk; N = 33 in a partial tile; n > 4 takes the float twin."""
    blocks, scales, bias, g = random_mxfp4(33, K, seed=K + n)
    x = torch.randn(n, K, generator=g) * torch.logspace(-3, 3, K // 32).repeat_interleave(32)
    w = dequantize(blocks, scales, torch.float32).double()
    y = cpu.mxfp4_linear(x, blocks, scales, bias, variant="avx512", quantize_x=True)
    exact = x.double() @ w.T + bias.double()
    step = x.abs().reshape(n, -1, 32).amax(-1).double() / 32512  # [n, G]
    rounding = REL * (x.double().abs() @ w.abs().T + bias.double().abs())
    tol = (step.repeat_interleave(32, -1) / 2) @ w.abs().T + rounding
    assert ((y.double() - exact).abs() <= tol).all()
    assert not torch.equal(y, cpu.mxfp4_linear(x, blocks, scales, bias, variant="avx512"))


@VNNI
def test_quantized_decode_exact_on_16_bit_x() -> None:
    """x already of the form s * q (integers with a +-127 in each block: s = 1/256 exactly) is
    not rounded, so every code and the scale bytes 20..199 must give the exact products (far
    smaller scales would make fp32 subnormals, larger ones overflow the sums)."""
    g = torch.Generator().manual_seed(3)
    j = torch.arange(16, dtype=torch.uint8)
    blocks = (j | ((15 - j) << 4)).repeat(180, 5, 1)  # every code in both nibble positions
    scales = (torch.arange(180 * 5) % 180 + 20).to(torch.uint8).reshape(180, 5)
    x = torch.randint(-127, 128, (7, 160), generator=g).float()
    x[:, ::32] = 127.0
    w = dequantize(blocks, scales, torch.float32)
    for n in (3, 7):  # the integer kernel, its float twin
        y = cpu.mxfp4_linear(x[:n], blocks, scales, variant="avx512", quantize_x=True)
        assert_close(y, x[:n], w, None)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("n", [0, 1, 2, 5, 17])
@pytest.mark.parametrize("K", [1, 17, 32, 2880, 2883])
@pytest.mark.parametrize("N", [1, 3, 33, 257])
def test_bf16_linear_matches_reference(N: int, K: int, n: int, variant: str) -> None:
    g = torch.Generator().manual_seed(N * K + n)
    weight = torch.randn(N, K, generator=g).bfloat16()
    x = torch.randn(n, K, generator=g)
    y = cpu.bf16_linear(x, weight, variant=variant)
    assert_close(y, x, weight.float(), None)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("bias_dtype", [None, torch.bfloat16, torch.float32])
def test_bf16_linear_bias_and_exact_weights(bias_dtype: torch.dtype | None, variant: str) -> None:
    g = torch.Generator().manual_seed(2)
    weight = (torch.randn(19, 45, generator=g) * 1e3).bfloat16()
    bias = None if bias_dtype is None else torch.randn(19, generator=g).to(bias_dtype)
    x = torch.randn(6, 45, generator=g)
    assert_close(cpu.bf16_linear(x, weight, bias, variant=variant), x, weight.float(), bias)
    # one-hot rows read the weights back bit for bit: the bf16 -> fp32 widening is exact
    assert torch.equal(cpu.bf16_linear(torch.eye(45), weight, variant=variant).T, weight.float())


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("n", [0, 1, 3, 5, 17])
@pytest.mark.parametrize("K", [1, 17, 32, 2880, 2883])
@pytest.mark.parametrize("N", [1, 3, 33])
def test_f32_linear_matches_reference(N: int, K: int, n: int, variant: str) -> None:
    g = torch.Generator().manual_seed(N * K + n)
    weight = torch.randn(N, K, generator=g)
    bias = torch.randn(N, generator=g)
    x = torch.randn(n, K, generator=g)
    assert_close(cpu.f32_linear(x, weight, bias, variant=variant), x, weight, bias)
    assert_close(cpu.f32_linear(x, weight, bias.bfloat16(), variant=variant), x, weight,
                 bias.bfloat16())  # fmt: skip


def linears(N: int, K: int, seed: int) -> dict[str, Callable[..., torch.Tensor]]:
    """name -> f(x, **kw): the same random layer through each dense or MXFP4 kernel."""
    g = torch.Generator().manual_seed(seed)
    bf16, f32, bias = torch.randn(N, K, generator=g).bfloat16(), torch.randn(N, K, generator=g), \
        torch.randn(N, generator=g)  # fmt: skip
    fns = {
        "bf16": lambda x, **kw: cpu.bf16_linear(x, bf16, bias, **kw),
        "f32": lambda x, **kw: cpu.f32_linear(x, f32, bias.bfloat16(), **kw),
    }
    if K % 32 == 0:
        blocks, scales, _, _ = random_mxfp4(N, K, seed)
        fns["mxfp4"] = lambda x, **kw: cpu.mxfp4_linear(x, blocks, scales, bias, **kw)
    return fns


BATCH_SIZES = (2, 5, 8, 37, 300)  # register path (<= 4 rows), tiles, partial tiles, 4 panels


def assert_row_invariant(f: Callable[[torch.Tensor], torch.Tensor], K: int, seed: int) -> None:
    """f(row) equals row i of f(batch) bit for bit, the row at random places among random
    others, for every batch size."""
    g = torch.Generator().manual_seed(seed)
    row = torch.randn(1, K, generator=g)
    alone = f(row)[0]
    for n in BATCH_SIZES:
        batch = torch.randn(n, K, generator=g) * torch.rand(n, 1, generator=g) * 10
        at = int(torch.randint(0, n, (1,), generator=g))
        batch[at] = row[0]
        assert torch.equal(f(batch)[at], alone), f"row {at} of {n} differs from the row alone"


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize(("N", "K"), [(37, 2880), (21, 2883), (13, 64), (50, 45)])
def test_linear_rows_are_batch_invariant(N: int, K: int, variant: str) -> None:
    """Each row's sums run in one order whatever n is: the decode (register) path and the
    prefill (tiled) path, every tile shape and position, agree to the bit."""
    for name, f in linears(N, K, seed=N + K).items():
        assert_row_invariant(lambda x, f=f: f(x, variant=variant), K, seed=len(name))


@VNNI
@pytest.mark.parametrize(("N", "K"), [(37, 2880), (70, 160), (5, 32)])
def test_quantized_rows_are_batch_invariant(N: int, K: int) -> None:
    """quantize_x: the integer-dot kernel (n <= 4) and its float twin (n > 4) agree to the bit,
    also with scale bytes 1..230 (0 and the largest ones excepted: see mxfp4_q16.c)."""
    f = linears(N, K, seed=5)["mxfp4"]
    assert_row_invariant(lambda x: f(x, quantize_x=True), K, seed=6)
    blocks, scales, bias, _ = random_mxfp4(N, K, seed=8, lo=1, hi=231)
    assert_row_invariant(lambda x: cpu.mxfp4_linear(x, blocks, scales, bias, quantize_x=True),
                         K, seed=9)  # fmt: skip


@pytest.mark.parametrize("variant", VARIANTS)
def test_more_rows_than_one_pass(variant: str) -> None:
    """Past one pass of x rows over W (64 rows for avx2, 96 for avx512), rows come out right."""
    blocks, scales, bias, g = random_mxfp4(35, 64, seed=6)
    x = torch.randn(150, 64, generator=g)
    y = cpu.mxfp4_linear(x, blocks, scales, bias, variant=variant)
    assert_close(y, x, dequantize(blocks, scales, torch.float32), bias)
    weight = torch.randn(35, 70, generator=g).bfloat16()
    x = torch.randn(150, 70, generator=g)
    assert_close(cpu.bf16_linear(x, weight, bias, variant=variant), x, weight.float(), bias)


@pytest.mark.parametrize("variant", VARIANTS)
def test_thread_count_does_not_change_results(variant: str) -> None:
    """Each output is computed by one thread in a fixed order, so threads change nothing."""
    for n in (3, 11):  # the decode and prefill paths
        for name, f in linears(301, 2880, seed=3).items():
            x = torch.randn(n, 2880, generator=torch.Generator().manual_seed(n))
            one = f(x, variant=variant, threads=1)
            assert torch.equal(one, f(x, variant=variant, threads=2)), name
            if name == "mxfp4":
                one = f(x, variant=variant, threads=1, quantize_x=True)
                assert torch.equal(one, f(x, variant=variant, threads=2, quantize_x=True))


def test_expert_slices_of_a_stacked_tensor() -> None:
    """moe.py passes w.mlp1_blocks[e]: a contiguous view into [E, N, G, 16] storage, no copy."""
    blocks, scales, bias, g = random_mxfp4(4 * 64, 64, seed=4)
    blocks, scales, bias = blocks.view(4, 64, 2, 16), scales.view(4, 64, 2), bias.view(4, 64)
    x = torch.randn(3, 64, generator=g)
    y = cpu.mxfp4_linear(x, blocks[2], scales[2], bias[2])
    assert_close(y, x, dequantize(blocks[2], scales[2], torch.float32), bias[2])


def test_rejects_bad_inputs() -> None:
    blocks, scales, _, _ = random_mxfp4(8, 64, seed=5)
    x = torch.randn(2, 64)
    with pytest.raises(AssertionError, match="float32"):
        cpu.mxfp4_linear(x.double(), blocks, scales)
    with pytest.raises(AssertionError, match="contiguous"):
        cpu.mxfp4_linear(torch.randn(64, 2).T, blocks, scales)
    with pytest.raises(AssertionError, match="does not match"):
        cpu.mxfp4_linear(torch.randn(2, 32), blocks, scales)
    with pytest.raises(AssertionError, match="bfloat16"):
        cpu.bf16_linear(x, torch.randn(8, 64))
    with pytest.raises(AssertionError, match="bias"):
        cpu.bf16_linear(x, torch.randn(8, 64).bfloat16(), torch.randn(8).half())
    with pytest.raises(ValueError, match="variant"):
        cpu.bf16_linear(x, torch.randn(8, 64).bfloat16(), variant="neon")


def _python(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, **env}
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=full_env, timeout=300
    )


FAILING_CC = """#!/bin/sh
[ "$1" = --version ] && echo "failing-cc 1.0" && exit 0
echo "kernels.c:1: error: no" >&2
echo "second line" >&2
exit 1
"""


@pytest.mark.parametrize("broken", ["missing", "failing"])
def test_no_compiler_warns_once_and_is_unavailable(tmp_path: Path, broken: str) -> None:
    """CC not found, or a compile that fails: one stderr line, available() False, no files."""
    cc = tmp_path / "cc"
    if broken == "failing":
        cc.write_text(FAILING_CC)
        cc.chmod(0o755)
    cache = tmp_path / "cache"
    code = "from moerun.ops import cpu; print(cpu.available(), cpu.available(), cpu.variant())"
    out = _python(code, CC=str(cc), XDG_CACHE_HOME=str(cache))
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "False", "None"]
    assert len(out.stderr.splitlines()) == 1, out.stderr
    assert ("not found" if broken == "missing" else "error: no") in out.stderr
    assert not (cache / "moerun").exists() or not any((cache / "moerun").iterdir())


@pytest.mark.slow  # compiles the C library twice from scratch
def test_fresh_cache_builds_once_and_env_forces_scalar(tmp_path: Path) -> None:
    code = "from moerun.ops import cpu; print(cpu.available(), cpu.variant())"
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path)}
    racers = [  # two processes compile into the same empty cache at once
        subprocess.Popen([sys.executable, "-c", code], stdout=PIPE, stderr=PIPE, text=True, env=env)
        for _ in range(2)
    ]
    for p in racers:
        stdout, stderr = p.communicate(timeout=300)
        assert p.returncode == 0 and stderr == "", stderr
        assert stdout.split() == ["True", cpu.variants()[0]]
    (lib,) = (tmp_path / "moerun").iterdir()  # the library only: no temporary file left behind
    assert lib.suffix == ".so"
    mtime = lib.stat().st_mtime_ns
    second = _python(code, XDG_CACHE_HOME=str(tmp_path), MOERUN_CPU_KERNEL="scalar")
    assert second.stdout.split() == ["True", "scalar"]
    assert lib.stat().st_mtime_ns == mtime  # loaded from the cache, not rebuilt


def random_experts(E: int, D: int, I: int, bias_dtype: torch.dtype, seed: int) -> ExpertWeights:
    g = torch.Generator().manual_seed(seed)

    def stack(out: int, inp: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        blocks = torch.randint(0, 256, (E, out, inp // 32, 16), dtype=torch.uint8, generator=g)
        scales = torch.randint(122, 130, (E, out, inp // 32), dtype=torch.uint8, generator=g)
        return blocks, scales, torch.randn(E, out, generator=g).to(bias_dtype)

    return ExpertWeights(*stack(2 * I, D), *stack(D, I))


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize(("T", "A"), [(1, 4), (3, 2), (17, 3), (40, 4)])
@pytest.mark.parametrize("bias_dtype", [torch.float32, torch.bfloat16])
def test_moe_experts_matches_the_torch_loop(T: int, A: int, bias_dtype, variant: str) -> None:
    """The one-call C MoE equals moe.py's reference loop (dequantize + matmul) in fp32: expert
    grouping, both biases, both SwiGLU clamps, the routing weights and the per-token sum."""
    E, D, I, limit = 6, 64, 96, 7.0
    w = random_experts(E, D, I, bias_dtype, seed=T)
    g = torch.Generator().manual_seed(100 + T)
    x = torch.randn(T, D, generator=g)
    ids = torch.stack([torch.randperm(E - 1, generator=g)[:A] for _ in range(T)])  # E-1: unused
    gates = torch.softmax(torch.randn(T, A, generator=g), dim=-1)
    want = moe_experts(x, ids, gates, w, limit)  # the torch reference path
    h = x @ dequantize(w.mlp1_blocks[0], w.mlp1_scales[0], torch.float32).T
    assert (h[:, ::2] > limit).any() and (h[:, 1::2].abs() > limit).any()  # the clamps act
    got = cpu.moe_experts(x, ids, gates, w, limit, SWIGLU_ALPHA, variant=variant)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


def test_moe_experts_rejects_bad_ids() -> None:
    w = random_experts(4, 32, 32, torch.float32, seed=0)
    x, gates = torch.randn(2, 32), torch.ones(2, 2)
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        cpu.moe_experts(x, torch.tensor([[0, 4], [1, 2]]), gates, w, 7.0, SWIGLU_ALPHA)


@VNNI
@pytest.mark.parametrize(("T", "A"), [(1, 4), (3, 2), (17, 3)])
def test_moe_experts_quantized_decode(T: int, A: int) -> None:
    """With quantize_x, layers whose experts have <= 4 rows run all of mlp1, then all of mlp2,
    as batched integer-dot jobs, others expert by expert (T = 17 routes > 4 rows to an expert:
    the float twin); x's 16-bit rounding (2^-16 of a block's largest value, twice) stays far
    inside 1e-3 of the output's scale, and it does happen."""
    E, D, I, limit = 6, 64, 96, 7.0
    w = random_experts(E, D, I, torch.bfloat16, seed=T)
    g = torch.Generator().manual_seed(200 + T)
    x = torch.randn(T, D, generator=g)
    ids = torch.stack([torch.randperm(E, generator=g)[:A] for _ in range(T)])
    gates = torch.softmax(torch.randn(T, A, generator=g), dim=-1)
    want = moe_experts(x, ids, gates, w, limit)
    got = cpu.moe_experts(x, ids, gates, w, limit, SWIGLU_ALPHA, quantize_x=True)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-3 * want.abs().max().item())
    exact = cpu.moe_experts(x, ids, gates, w, limit, SWIGLU_ALPHA)
    assert not torch.equal(got, exact)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("quantize", [False, True])
def test_moe_token_is_batch_invariant(quantize: bool, variant: str) -> None:
    """A token alone equals the same token among 1..299 others, many routed to its experts (so
    its experts run 1, a few, or hundreds of rows: decode and prefill kernels), bit for bit."""
    if quantize and not (variant == "avx512" and cpu.has_vnni()):
        pytest.skip("quantize_x only changes the avx512 variant on a CPU with VNNI")
    E, D, I, A = 8, 64, 96, 4
    w = random_experts(E, D, I, torch.bfloat16, seed=9)
    g = torch.Generator().manual_seed(10)
    x = torch.randn(1, D, generator=g)
    ids, gates = torch.tensor([[5, 1, 6, 2]]), torch.softmax(torch.randn(1, A, generator=g), -1)

    def moe(x: torch.Tensor, ids: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
        return cpu.moe_experts(x, ids, gates, w, 7.0, SWIGLU_ALPHA, variant=variant,
                               quantize_x=quantize)  # fmt: skip

    alone = moe(x, ids, gates)[0]
    for T in BATCH_SIZES:
        xs = torch.randn(T, D, generator=g)
        all_ids = torch.stack([torch.randperm(E, generator=g)[:A] for _ in range(T)])
        all_ids[: T // 2, 0] = 5  # crowd expert 5, in slot 0 like the token's
        all_gates = torch.softmax(torch.randn(T, A, generator=g), dim=-1)
        at = int(torch.randint(0, T, (1,), generator=g))
        xs[at], all_ids[at], all_gates[at] = x[0], ids[0], gates[0]
        assert torch.equal(moe(xs, all_ids, all_gates)[at], alone), f"token {at} of {T}"
