"""MXFP4 codec (spec §3.1): 32 E2M1 codes per block, one E8M0 scale byte per block.

Layout: blocks [..., G, 16] uint8 (element 2j = low nibble of byte j, 2j+1 = high nibble),
scales [..., G] uint8 with value 2**(byte - 127). G = in_features / 32.
"""

import torch

BLOCK_SIZE = 32  # elements that share one scale
BYTES_PER_BLOCK = 16  # two 4-bit codes per byte
SCALE_BIAS = 127  # E8M0 exponent bias

# E2M1 code -> value; bit 3 is the sign, bits 2..1 the exponent (bias 1), bit 0 the mantissa.
FP4_VALUES = (
    +0.0, +0.5, +1.0, +1.5, +2.0, +3.0, +4.0, +6.0,
    -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0,
)  # fmt: skip
FP4_MAX = 6.0

# Midpoints between consecutive magnitudes 0, .5, 1, 1.5, 2, 3, 4, 6. A value exactly on a
# midpoint rounds to the even code (mantissa bit 0), as IEEE round-to-nearest-even does.
_MIDPOINTS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)


def dequantize(
    blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.bfloat16
) -> torch.Tensor:
    """[..., G, 16] uint8 codes + [..., G] uint8 scales -> [..., G*32] values in `dtype`.

    Exact in bf16 and fp32 (each value has at most 2 significant bits) unless 2**(s-127)
    times the code leaves the dtype's range, where it overflows to inf like the reference.
    """
    if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8:
        raise TypeError(f"MXFP4 tensors must be uint8, got {blocks.dtype} / {scales.dtype}")
    if blocks.shape[:-1] != scales.shape or blocks.shape[-1] != BYTES_PER_BLOCK:
        raise ValueError(
            f"MXFP4 blocks {tuple(blocks.shape)} do not match scales {tuple(scales.shape)}"
        )
    lut = torch.tensor(FP4_VALUES, dtype=dtype, device=blocks.device)
    # [..., G, 16, 2]: low nibble first, then high nibble
    codes = torch.stack((blocks & 0x0F, blocks >> 4), dim=-1).long()
    values = lut[codes].flatten(-2)  # [..., G, 32]
    exponents = scales.to(torch.int32) - SCALE_BIAS
    values = torch.ldexp(values, exponents.unsqueeze(-1)).to(dtype)
    return values.flatten(-2)  # [..., G*32]


def _round_to_e2m1(x: torch.Tensor) -> torch.Tensor:
    """Nearest E2M1 code (uint8, sign in bit 3) of values already divided by their scale."""
    mag = x.abs()
    code = torch.zeros(x.shape, dtype=torch.uint8, device=x.device)
    for i, mid in enumerate(_MIDPOINTS):
        # midpoint i lies between codes i and i+1: ties go to whichever is even
        code += (mag > mid) if i % 2 == 0 else (mag >= mid)
    code |= torch.signbit(x).to(torch.uint8) << 3  # keeps -0.0 so codes round-trip bit for bit
    return code


def quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[..., K] float (K % 32 == 0) -> (blocks [..., K/32, 16] uint8, scales [..., K/32] uint8).

    Each block takes the smallest power-of-two scale that fits its largest magnitude into
    [-6, 6] (no saturation), so values that are already MXFP4 round-trip exactly; then every
    element rounds to the nearest E2M1 value.
    """
    if w.shape[-1] % BLOCK_SIZE:
        raise ValueError(f"last dimension {w.shape[-1]} is not a multiple of {BLOCK_SIZE}")
    x = w.float().reshape(*w.shape[:-1], -1, BLOCK_SIZE)  # [..., G, 32]
    amax = x.abs().amax(dim=-1)  # [..., G]
    tiny = torch.finfo(torch.float32).tiny
    exp = torch.ceil(torch.log2(torch.clamp(amax, min=tiny) / FP4_MAX))
    exp = torch.where(amax > 0, exp, torch.full_like(exp, -SCALE_BIAS))
    exp = exp.clamp(-SCALE_BIAS, 254 - SCALE_BIAS)  # byte 255 is NaN in E8M0
    # divide by 2**exp in two exact steps: 2**-127 alone is subnormal in fp32 but fine as a pair
    half = torch.floor(exp / 2)
    scaled = torch.ldexp(torch.ldexp(x, -half.unsqueeze(-1)), -(exp - half).unsqueeze(-1))
    codes = _round_to_e2m1(scaled)  # [..., G, 32]
    packed = codes[..., 0::2] | (codes[..., 1::2] << 4)  # [..., G, 16]
    return packed.contiguous(), (exp + SCALE_BIAS).to(torch.uint8)
