"""MXFP4 codec (spec §3.1): decoding checked against the E2M1 bit definition, encoding against a
float64 brute-force nearest search."""

import math

import pytest
import torch

from moerun.ops.mxfp4 import FP4_VALUES, dequantize, quantize

DTYPES = [torch.float32, torch.bfloat16]


def e2m1(code: int) -> float:
    """Value of a 4-bit E2M1 code from its bits: sign bit 3, exponent bits 2..1 (bias 1),
    mantissa bit 0; exponent 0 is subnormal (0.m * 2**(1 - bias))."""
    sign = -1.0 if code & 0b1000 else 1.0
    exp, man = (code >> 1) & 0b11, code & 1
    mag = man * 0.5 if exp == 0 else 2.0 ** (exp - 1) * (1 + man / 2)
    return math.copysign(mag, sign)


# magnitudes of codes 0..7, derived independently of the module's table
MAGS = [e2m1(c) for c in range(8)]


def test_e2m1_oracle_matches_spec_table() -> None:
    # the spec §3.1 table, typed in by hand: guards the oracle itself
    spec = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0]
    assert [e2m1(c) for c in range(16)] == spec
    assert [math.copysign(1, e2m1(c)) for c in range(16)] == [math.copysign(1, v) for v in spec]


def test_fp4_values_table() -> None:
    assert len(FP4_VALUES) == 16
    for code, value in enumerate(FP4_VALUES):
        assert value == e2m1(code)
        assert math.copysign(1, value) == math.copysign(1, e2m1(code)), code


@pytest.mark.parametrize("dtype", DTYPES)
def test_spec_worked_example(dtype: torch.dtype) -> None:
    blocks = torch.zeros(1, 16, dtype=torch.uint8)
    blocks[0, 0] = 0xA3
    half = dequantize(blocks, torch.tensor([0x7E], dtype=torch.uint8), dtype)
    one = dequantize(blocks, torch.tensor([0x7F], dtype=torch.uint8), dtype)
    assert half.dtype == dtype and half.shape == (32,)
    assert half[:2].tolist() == [0.75, -0.5]
    assert one[:2].tolist() == [1.5, -1.0]
    assert not half[2:].any()


@pytest.mark.parametrize("dtype", DTYPES)
def test_every_byte_value(dtype: torch.dtype) -> None:
    # 256 bytes as 16 blocks of 16; byte b sits at flat position b, its elements at 2b, 2b+1
    blocks = torch.arange(256, dtype=torch.int32).to(torch.uint8).reshape(16, 16)
    scales = torch.full((16,), 127, dtype=torch.uint8)
    out = dequantize(blocks, scales, dtype)
    assert out.dtype == dtype and out.shape == (512,)
    expected = torch.tensor(
        [e2m1(c) for b in range(256) for c in (b & 0x0F, b >> 4)], dtype=torch.float64
    )
    assert torch.equal(out.double(), expected)
    # -0.0 == 0.0 numerically; the sign bit must survive too (code 8)
    assert torch.equal(torch.signbit(out), torch.signbit(expected))
    assert torch.signbit(out[2 * 0x08]) and torch.signbit(out[2 * 0x80 + 1])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scale", [0, 1, 100, 126, 127, 128, 200, 253, 254])
def test_scale_bytes_including_extremes(dtype: torch.dtype, scale: int) -> None:
    # byte j holds codes 2j (low) and 2j+1 (high): all 16 codes... twice per block
    codes = list(range(16)) * 2
    row = [codes[2 * j] | (codes[2 * j + 1] << 4) for j in range(16)]
    blocks = torch.tensor([row], dtype=torch.uint8)
    out = dequantize(blocks, torch.tensor([scale], dtype=torch.uint8), dtype)
    # exact in float64; rounding to the target dtype only overflows (values have 2 bits)
    exact = torch.tensor([e2m1(c) * 2.0 ** (scale - 127) for c in codes], dtype=torch.float64)
    expected = exact.to(dtype)
    assert out.dtype == dtype
    assert torch.equal(out, expected)  # inf == inf compares equal
    assert torch.equal(torch.signbit(out), torch.signbit(expected))
    if scale == 254:  # 2 * 2**127 = 2**128 is past both dtypes' max
        assert torch.isinf(out[[4, 5, 6, 7]]).all() and torch.isfinite(out[:4]).all()
    if scale == 0:  # 0.5 * 2**-127 = 2**-128: subnormal, not flushed to zero
        assert out[1].item() == 2.0**-128


@pytest.mark.parametrize("dtype", DTYPES)
def test_dequantize_shapes_and_scale_per_block(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(1)
    blocks = torch.randint(0, 256, (3, 5, 4, 16), dtype=torch.uint8, generator=g)
    scales = torch.randint(120, 135, (3, 5, 4), dtype=torch.uint8, generator=g)
    out = dequantize(blocks, scales, dtype)
    assert out.shape == (3, 5, 128)
    # element g*32 + 2j (+1) = code of nibble of byte j of block g, times that block's scale
    e, r, blk, j = 2, 3, 1, 7
    byte, s = int(blocks[e, r, blk, j]), int(scales[e, r, blk])
    assert out[e, r, blk * 32 + 2 * j].item() == e2m1(byte & 15) * 2.0 ** (s - 127)
    assert out[e, r, blk * 32 + 2 * j + 1].item() == e2m1(byte >> 4) * 2.0 ** (s - 127)


def _random_mxfp4(shape: tuple[int, ...], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random codes whose every block reaches magnitude 4 or 6, so the block's scale is the
    one quantize must choose back (a block topping out at 3 would pick a smaller scale)."""
    g = torch.Generator().manual_seed(seed)
    blocks = torch.randint(0, 256, (*shape, 16), dtype=torch.uint8, generator=g)
    big = torch.tensor([6, 7, 14, 15], dtype=torch.uint8)
    pick = big[torch.randint(0, 4, shape, generator=g)]
    pos = torch.randint(0, 16, shape, generator=g)  # which byte's low nibble gets it
    sel = torch.nn.functional.one_hot(pos, 16).bool()
    forced = (blocks & 0xF0) | pick.unsqueeze(-1)
    blocks = torch.where(sel, forced, blocks)
    scales = torch.randint(110, 145, shape, dtype=torch.uint8, generator=g)
    return blocks, scales


@pytest.mark.parametrize("dtype", DTYPES)
def test_round_trip_is_bit_exact(dtype: torch.dtype) -> None:
    blocks, scales = _random_mxfp4((3, 7, 5), seed=2)
    x = dequantize(blocks, scales, dtype)
    qb, qs = quantize(x)
    assert qb.dtype == torch.uint8 and qs.dtype == torch.uint8
    assert torch.equal(qb, blocks)
    assert torch.equal(qs, scales)
    y = dequantize(qb, qs, dtype)
    # bitwise, so -0.0 vs +0.0 would be caught
    bits = torch.int32 if dtype == torch.float32 else torch.int16
    assert torch.equal(y.view(bits), x.view(bits))


def _expected_exponent(amax: float) -> int:
    """Smallest e with amax / 2**e <= 6, clamped to E8M0's range [-127, 127]; float64 search."""
    if amax == 0:
        return -127
    e = math.ceil(math.log2(amax / 6))
    while amax / 2.0 ** (e - 1) <= 6:
        e -= 1
    while amax / 2.0**e > 6:
        e += 1
    return max(-127, min(127, e))


def _nearest_codes(x: list[float], e: int) -> list[int]:
    """Brute force over all 16 codes: nearest value, ties to the even code; zero keeps x's sign."""
    out = []
    for v in x:
        best = min(range(8), key=lambda c: (abs(abs(v) - MAGS[c] * 2.0**e), c & 1))
        neg = math.copysign(1, v) < 0
        out.append(best | (8 if neg else 0))
    return out


def _codes(blocks: torch.Tensor) -> torch.Tensor:
    """[..., G, 16] bytes -> [..., G, 32] codes in element order (low nibble first)."""
    return torch.stack((blocks & 15, blocks >> 4), dim=-1).flatten(-2)


def test_quantize_random_floats_nearest_and_smallest_scale() -> None:
    g = torch.Generator().manual_seed(3)
    # every block gets its own binade, -30..29, so scales vary widely
    binade = torch.randint(-30, 30, (6, 8, 2), generator=g).float()
    x = torch.randn(6, 8, 64, generator=g) * torch.exp2(binade).repeat_interleave(32, dim=-1)
    blocks, scales = quantize(x)
    assert blocks.shape == (6, 8, 2, 16) and scales.shape == (6, 8, 2)
    xb = x.double().reshape(-1, 32)
    codes = _codes(blocks).reshape(-1, 32)
    for i in range(xb.shape[0]):
        row = xb[i].tolist()
        e = _expected_exponent(max(abs(v) for v in row))
        assert int(scales.reshape(-1)[i]) == e + 127, i
        assert codes[i].tolist() == _nearest_codes(row, e), i


def _f32_next(x: float, toward: float) -> float:
    """The adjacent float32 (math.nextafter would step a float64 ulp, lost in the cast)."""
    return torch.nextafter(torch.tensor(x), torch.tensor(toward)).item()


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_quantize_ties_go_to_even_code(sign: float) -> None:
    # element 0 = 6 fixes the scale at 2**0, so these sit exactly on the midpoints
    mids = [0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0]
    even = [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0]  # of the two neighbours, the one with mantissa 0
    above = [0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]
    below = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0]
    up = [_f32_next(m, math.inf) for m in mids]  # just past a midpoint: the upper value
    down = [_f32_next(m, 0) for m in mids]
    vals = [6.0] + mids + up + down
    x = torch.tensor(vals + [0.0] * (32 - len(vals)), dtype=torch.float32) * sign
    x[0] = 6.0
    blocks, scales = quantize(x)
    assert scales.tolist() == [127]
    y = dequantize(blocks, scales, torch.float32)
    n = len(mids)
    assert y[1 : 1 + n].tolist() == [sign * v for v in even]
    assert y[1 + n : 1 + 2 * n].tolist() == [sign * v for v in above]
    assert y[1 + 2 * n : 1 + 3 * n].tolist() == [sign * v for v in below]


def test_quantize_inverts_spec_worked_example() -> None:
    # 0.75, -0.5 with block max 3 -> scale 2**-1, codes 3 (1.5) and 10 (-1.0): byte 0xA3, 0x7E
    x = torch.zeros(32)
    x[0], x[1], x[31] = 0.75, -0.5, 3.0
    blocks, scales = quantize(x)
    assert scales.tolist() == [0x7E]
    assert blocks[0, 0].item() == 0xA3
    assert blocks[0, 15].item() == 0x70  # element 31 = high nibble of byte 15: code 7 (6.0)
    assert blocks[0, 1:15].tolist() == [0] * 14


@pytest.mark.parametrize(
    ("amax", "scale_byte"),
    [
        (6.0, 127),
        (_f32_next(6.0, math.inf), 128),  # one ulp too big for 6 * 2**0
        (_f32_next(6.0, 0), 127),
        (3.0, 126),  # 3 / 2**-1 = 6 exactly
        (3.0000002, 127),
        (4.0, 127),  # 4 / 2**-1 = 8 > 6
        (0.1, 122),  # 0.1 / 2**-6 = 6.4 > 6, 0.1 / 2**-5 = 3.2: e = -5
        (6.0 * 2.0**100, 227),
        (6.0 * 2.0**-126, 1),
        (6.0 * 2.0**-127, 0),
    ],
)
def test_quantize_picks_smallest_fitting_power_of_two(amax: float, scale_byte: int) -> None:
    x = torch.zeros(32)
    x[5] = -amax  # the sign must not matter for the scale
    blocks, scales = quantize(x)
    assert scales.tolist() == [scale_byte]
    assert x[5].abs().item() / 2.0 ** (scale_byte - 127) <= 6
    assert x[5].abs().item() / 2.0 ** (scale_byte - 128) > 6


def test_all_zero_block() -> None:
    x = torch.zeros(2, 64)
    x[1, 32:] = -0.0
    x[1, 0] = 1.0  # only block (1, 0) is non-zero
    blocks, scales = quantize(x)
    # no power of two is "needed": the smallest one, 2**-127 (byte 0)
    assert scales.tolist() == [[0, 0], [127 - 2, 0]]
    assert not blocks[0].any()
    assert (blocks[1, 1] == 0x88).all()  # -0.0 keeps its sign: code 8 in both nibbles
    y = dequantize(blocks, scales, torch.float32)
    assert torch.equal(y, x)
    assert torch.equal(torch.signbit(y), torch.signbit(x))


def test_tiny_values_clamp_to_scale_byte_zero() -> None:
    x = torch.zeros(32)
    # 2**-128 = 0.5 * 2**-127, 1.5 * 2**-127, 2**-140 (rounds to 0), min subnormal 2**-149
    x[0], x[1], x[2], x[3] = 2.0**-128, -3 * 2.0**-128, 2.0**-140, 2.0**-149
    blocks, scales = quantize(x)
    assert scales.tolist() == [0]
    assert _codes(blocks)[0, :4].tolist() == [1, 8 | 3, 0, 0]
    y = dequantize(blocks, scales, torch.float32)
    assert y[:4].tolist() == [2.0**-128, -3 * 2.0**-128, 0.0, 0.0]


def test_quantize_3d_shapes_and_bf16_input() -> None:
    blocks, scales = _random_mxfp4((4, 6, 3), seed=4)
    w = dequantize(blocks, scales, torch.bfloat16)  # [E, out, in] = [4, 6, 96]
    assert w.shape == (4, 6, 96)
    qb, qs = quantize(w)
    assert qb.shape == (4, 6, 3, 16) and qs.shape == (4, 6, 3)
    assert torch.equal(qb, blocks) and torch.equal(qs, scales)


def test_errors() -> None:
    with pytest.raises(ValueError, match="32"):
        quantize(torch.zeros(4, 48))
    blocks, scales = _random_mxfp4((2,), seed=5)
    with pytest.raises(TypeError):
        dequantize(blocks.to(torch.int16), scales)
    with pytest.raises(TypeError):
        dequantize(blocks, scales.float())
    with pytest.raises(ValueError):
        dequantize(blocks, scales[:1])  # one scale for two blocks
    with pytest.raises(ValueError):
        dequantize(blocks[:, :8], scales)  # 8 bytes is not a 32-element block
