"""8-bit dense weights (`dense_weights="int8"`): the readable reference of ops/cpu/int8.c.

A weight W [N, K] is stored as Q int8 [N, K] and one fp32 scale per output row, s = the row's
absmax / 127, Q = round(W / s) (per channel: one scale per row lets a whole row's dot product be
one exact integer sum; measured against bf16 by `moerun score --compare-to bf16`). Activations
are quantized per row to 16 bits (|error| <= the row's absmax / 65024, below bf16's own
rounding), so y = s * t * (Q . q) + bias with an exact integer dot, rounded once.
"""

from typing import NamedTuple

import torch

ROWS_PER_CHUNK = 4096  # quantize a big matrix (the unembedding) a slice at a time


class Int8Weight(NamedTuple):
    q: torch.Tensor  # [N, K] int8
    scale: torch.Tensor  # [N] float32
    row_sum: torch.Tensor  # [N] int32: sum of q over each row (the kernel's byte offsets)

    @property
    def shape(self) -> torch.Size:
        return self.q.shape

    def dequantize(self) -> torch.Tensor:
        return self.q.float() * self.scale[:, None]


def quantize_weight(w: torch.Tensor) -> Int8Weight:
    """W [N, K] (any float dtype) -> Int8Weight, in row slices so that a 201,088-row
    unembedding never has a full fp32 copy."""
    N, K = w.shape
    q = torch.empty(N, K, dtype=torch.int8)
    scale = torch.empty(N, dtype=torch.float32)
    for r in range(0, N, ROWS_PER_CHUNK):
        part = w[r : r + ROWS_PER_CHUNK].float()
        s = part.abs().amax(dim=1) / 127
        s = torch.where(s > 0, s, torch.ones_like(s))  # an all-zero row: Q = 0, any scale
        q[r : r + ROWS_PER_CHUNK] = torch.round(part / s[:, None]).to(torch.int8)
        scale[r : r + ROWS_PER_CHUNK] = s
    return Int8Weight(q, scale, q.sum(dim=1, dtype=torch.int32))


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [n, K] fp32 -> (q [n, K] int64, t [n]) with x ~= t * q, |q| <= 32512; t is NaN for a
    row holding a NaN or an inf (its outputs are NaN), 0 for a zero row."""
    mx = x.abs().nan_to_num(0.0, posinf=0.0).amax(dim=1)
    bad = ~torch.isfinite(x).all(dim=1)
    t = torch.where(bad, torch.full_like(mx, float("nan")), mx / 32512)
    ok = t > 0
    safe = torch.where(ok, t, torch.ones_like(t))
    q = torch.where(ok[:, None], torch.round(x / safe[:, None]), 0).to(torch.int64)
    return q, t


def int8_linear(x: torch.Tensor, w: Int8Weight, bias: torch.Tensor | None) -> torch.Tensor:
    """y = (float)(dot * (s * t)) + bias, dot the exact integer Q . q (in float64, exact for
    |dot| < 2**53), x's dtype out."""
    xf = x.float()
    q, t = quantize_rows(xf)
    dot = q.double() @ w.q.double().T  # [n, N]: integers, exact
    st = (w.scale[None, :] * t[:, None]).double()  # s * t rounded to fp32 first
    y = (dot * st).float()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)
