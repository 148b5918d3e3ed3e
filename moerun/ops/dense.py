"""Reference dense ops: linear and RMSNorm, the readable oracles of the fast backends."""

import torch
import torch.nn.functional as F

from moerun.ops.int8 import Int8Weight, int8_linear


def linear(
    x: torch.Tensor, weight: torch.Tensor | Int8Weight, bias: torch.Tensor | None
) -> torch.Tensor:
    if isinstance(weight, Int8Weight):
        return int8_linear(x, weight, bias)
    return F.linear(x, weight, bias)


def rms_norm(x: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
    """x [T, D], scale [D] fp32: fp32 statistics and scale, one rounding to x's dtype."""
    t = x.float()
    t = t * torch.rsqrt(torch.mean(t**2, dim=-1, keepdim=True) + eps)
    return (t * scale).to(x.dtype)
