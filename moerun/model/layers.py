"""The gpt-oss transformer's small layers (spec §2): RMSNorm, linear projections (bf16 or 8-bit),
the embedding, YaRN RoPE and the packed MXFP4 expert weights. moerun/model/gpt_oss.py assembles
them; each calls the backend's ops (moerun.ops.backend), never a kernel directly.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from moerun.model.config import ModelConfig, yarn_bounds
from moerun.ops.backend import Ops
from moerun.ops.int8 import Int8Weight, quantize_weight


class RMSNorm(nn.Module):
    def __init__(self, cfg: ModelConfig, ops: Ops) -> None:
        super().__init__()
        self.eps, self.ops = cfg.rms_norm_eps, ops
        self.scale = nn.Buffer(torch.ones(cfg.hidden_size, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ops.rms_norm(x, self.scale, self.eps)


class Linear(nn.Module):
    def __init__(self, in_features: int, out_features: int, ops: Ops, bias: bool = True) -> None:
        super().__init__()
        self.ops = ops
        self.weight = nn.Buffer(torch.empty(out_features, in_features))
        self.bias = nn.Buffer(torch.empty(out_features)) if bias else None
        # 8-bit weights (quantize_int8): weight int8, its per-row scales and row sums
        self.register_buffer("scale", None)
        self.register_buffer("row_sum", None)

    def quantize_int8(self) -> None:
        q = quantize_weight(self.weight)
        self.weight, self.scale, self.row_sum = (nn.Buffer(t) for t in q)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.scale is not None:
            return self.ops.linear(x, Int8Weight(self.weight, self.scale, self.row_sum), self.bias)
        return self.ops.linear(x, self.weight, self.bias)


class Embedding(nn.Module):
    def __init__(self, vocab_size: int, hidden_size: int) -> None:
        super().__init__()
        self.weight = nn.Buffer(torch.empty(vocab_size, hidden_size))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return F.embedding(tokens, self.weight)


class Rope(nn.Module):
    """YaRN rotary embedding, half-split pairs (i, i + d/2), cos/sin scaled by the concentration."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        d = cfg.head_dim
        freq = cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d)
        f = cfg.rope_scaling_factor
        if f > 1.0:
            self.concentration = 0.1 * math.log(f) + 1.0
            low, high = yarn_bounds(cfg)
            ramp = (torch.arange(d // 2, dtype=torch.float32) - low) / (high - low)
            mask = 1 - ramp.clamp(0, 1)  # 1 = keep the original frequency (extrapolate)
            inv_freq = 1.0 / (f * freq) * (1 - mask) + 1.0 / freq * mask
        else:
            self.concentration, inv_freq = 1.0, 1.0 / freq
        self.inv_freq = nn.Buffer(inv_freq, persistent=False)

    def cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions.float()[:, None] * self.inv_freq[None, :]  # [T, d/2] fp32
        return freqs.cos() * self.concentration, freqs.sin() * self.concentration


class Mxfp4Weight(nn.Module):
    def __init__(self, experts: int, out_features: int, in_features: int) -> None:
        super().__init__()
        groups = in_features // 32
        self.blocks = nn.Buffer(torch.empty(experts, out_features, groups, 16, dtype=torch.uint8))
        self.scales = nn.Buffer(torch.empty(experts, out_features, groups, dtype=torch.uint8))
