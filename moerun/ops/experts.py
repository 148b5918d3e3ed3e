"""One layer's MXFP4 experts as the kernels receive them: a leaf, so every backend can name it."""

from typing import NamedTuple

import torch


class ExpertWeights(NamedTuple):
    """Packed as stored: blocks [E, out, in/32, 16] uint8, scales [E, out, in/32] uint8."""

    mlp1_blocks: torch.Tensor  # out = 2I, interleaved gate/linear rows
    mlp1_scales: torch.Tensor
    mlp1_bias: torch.Tensor  # [E, 2I]
    mlp2_blocks: torch.Tensor  # out = D
    mlp2_scales: torch.Tensor
    mlp2_bias: torch.Tensor  # [E, D]


SWIGLU_ALPHA = 1.702  # the sigmoid's slope in the clamped SwiGLU (spec §2.6)
