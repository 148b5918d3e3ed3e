"""A checkpoint's tensors (our names, full size) -> the slices one rank holds (parallel.shard).

Each slice is copied out of the mmap as it is cut and the source's pages released (`release`),
so a rank's memory is its share: its heads, its experts or its slice of every expert, its part
of the vocabulary, plus what every rank keeps whole (embedding, norms, router).
"""

from collections.abc import Callable

import torch

from moerun.model.config import ModelConfig
from moerun.parallel.shard import Shard


def shard_tensors(
    tensors: dict[str, torch.Tensor],
    cfg: ModelConfig,
    shard: Shard,
    release: Callable[[str], None] = lambda name: None,
) -> dict[str, torch.Tensor]:
    if shard.size == 1:
        return tensors
    out = {}
    for name, t in tensors.items():
        part = _slice(name, t, cfg, shard)
        if part is not t:
            part = part.contiguous().clone()  # the rank's own copy, not a view of the file
            release(name)
        out[name] = part
    return out


def _slice(name: str, t: torch.Tensor, cfg: ModelConfig, shard: Shard) -> torch.Tensor:
    leaf = name.split(".", 2)[-1] if name.startswith("block.") else name
    if leaf == "unembedding.weight":
        v0, v1 = shard.vocab(cfg)
        return t[v0:v1]
    if leaf.startswith("attn."):
        return _attention(leaf, t, cfg, shard)
    if leaf.startswith("mlp.mlp"):
        return _experts(leaf, t, cfg, shard)
    return t  # embedding, norms, router: whole on every rank


def _attention(leaf: str, t: torch.Tensor, cfg: ModelConfig, shard: Shard) -> torch.Tensor:
    if not shard.attention_parallel:
        return t
    (q0, q1), (k0, k1) = shard.heads(cfg)
    d = cfg.head_dim
    q, kv = slice(q0 * d, q1 * d), slice(k0 * d, k1 * d)
    if leaf in ("attn.q.weight", "attn.q.bias"):
        return t[q]
    if leaf in ("attn.k.weight", "attn.k.bias", "attn.v.weight", "attn.v.bias"):
        return t[kv]
    if leaf in ("attn.qkv.weight", "attn.qkv.bias"):  # original layout: rows [q; k; v]
        tq, tk, tv = t.split([cfg.q_size, cfg.kv_size, cfg.kv_size])
        return torch.cat([tq[q], tk[kv], tv[kv]])
    if leaf == "attn.sinks":
        return t[q0:q1]
    if leaf == "attn.out.weight":  # [D, q_size]: the input columns of this rank's heads
        return t[:, q]
    if leaf == "attn.out.bias":
        return t if shard.rank == 0 else torch.zeros_like(t)
    return t  # the norm


def _experts(leaf: str, t: torch.Tensor, cfg: ModelConfig, shard: Shard) -> torch.Tensor:
    if shard.expert_parallel:  # whole experts: every expert tensor starts with E
        e0, e1 = shard.experts(cfg)
        return t[e0:e1]
    i0, i1 = shard.intermediate(cfg)
    if leaf.startswith("mlp.mlp1"):  # [E, 2I, ...]: rows 2i (gate) and 2i+1 (linear)
        return t[:, 2 * i0 : 2 * i1]
    if leaf == "mlp.mlp2_bias":  # added once, after the sum over ranks
        return t if shard.rank == 0 else torch.zeros_like(t)
    # mlp2 blocks [E, D, I/32, 16] and scales [E, D, I/32]: this rank's 32-column groups
    return t[:, :, i0 // 32 : i1 // 32]
