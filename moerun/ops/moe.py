"""Mixture-of-experts feed-forward with MXFP4 expert weights (spec §2.6), reference path.

Only the selected experts run: token rows are grouped by expert and each expert's weights are
dequantized alone, so at most one expert is ever held unpacked. The op order and roundings follow
the reference: matmul, then a separate bias add; SwiGLU as separate ops; the routing-weighted sum
over the k experts accumulated in fp32 and rounded once.

Dims: T = tokens, A = active experts per token (top-k), D = hidden, I = expert intermediate.
"""

import torch

from moerun.ops.experts import SWIGLU_ALPHA, ExpertWeights
from moerun.ops.mxfp4 import dequantize


def swiglu(x: torch.Tensor, limit: float, alpha: float = SWIGLU_ALPHA) -> torch.Tensor:
    """[..., 2I] interleaved (even = gate, odd = linear) -> [..., I]."""
    gate, linear = x[..., ::2], x[..., 1::2]
    gate = gate.clamp(max=limit)  # the gate is clamped from above only
    linear = linear.clamp(min=-limit, max=limit)
    # note the +1 on the linear branch
    return gate * torch.sigmoid(alpha * gate) * (linear + 1)


def route(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Router logits [T, E] -> (expert ids [T, A], weights [T, A]): top-k, softmax over the k."""
    top = torch.topk(logits, k=k, dim=-1, sorted=True)
    return top.indices, torch.softmax(top.values, dim=-1)


def moe_experts(
    x: torch.Tensor,  # [T, D] normed activations
    expert_ids: torch.Tensor,  # [T, A]
    expert_weights: torch.Tensor,  # [T, A]
    w: ExpertWeights,
    limit: float,
    residual: torch.Tensor | None = None,  # [T, D]: returns residual + experts' output
) -> torch.Tensor:  # [T, D]
    """Reference: token rows grouped by expert, each expert dequantized alone."""
    T, A = expert_ids.shape
    flat = expert_ids.reshape(-1)  # [T*A], row r belongs to token r // A
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=w.mlp1_blocks.shape[0]).tolist()
    acc = torch.zeros(T, x.shape[1], dtype=torch.float32, device=x.device)
    gates = expert_weights.reshape(-1).float()
    start = 0
    for e, n in enumerate(counts):
        if n == 0:
            continue
        rows = order[start : start + n]
        start += n
        tokens = rows // A
        y = _expert_mlp(x[tokens], w, e, limit)  # [n, D]
        acc.index_add_(0, tokens, y.float() * gates[rows, None])
    out = acc.to(x.dtype)
    return out if residual is None else residual + out


def _expert_mlp(x: torch.Tensor, w: ExpertWeights, e: int, limit: float) -> torch.Tensor:
    """Reference: expert e's weights dequantized alone; matmul, then a separate bias add."""
    w1 = dequantize(w.mlp1_blocks[e], w.mlp1_scales[e], x.dtype)  # [2I, D]
    h = x @ w1.T + w.mlp1_bias[e]  # [n, 2I]
    del w1
    a = swiglu(h, limit)  # [n, I]
    w2 = dequantize(w.mlp2_blocks[e], w.mlp2_scales[e], x.dtype)  # [D, I]
    return a @ w2.T + w.mlp2_bias[e]  # [n, D]
