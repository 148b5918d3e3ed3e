"""The gpt-oss transformer (spec §2). Module names equal the original checkpoint's tensor names,
so loading is `load_state_dict(assign=True)` over mmap'd views: no copy, experts stay MXFP4.

Dims: T = tokens, D = hidden, K = kv heads, G = query heads per kv head, d = head dim, V = vocab.
"""

import math
import os
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from moerun.config import KERNELS
from moerun.errors import ConfigError
from moerun.model.checkpoint import Checkpoint
from moerun.model.config import ModelConfig, yarn_bounds
from moerun.ops import cpu
from moerun.ops.attention import CacheIO, PagedIO, SeqRows, batch_attention
from moerun.ops.moe import ExpertWeights, moe_experts, route

if TYPE_CHECKING:
    from moerun.engine.kv_cache import KVCache


class RMSNorm(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.eps = cfg.rms_norm_eps
        self.scale = nn.Buffer(torch.ones(cfg.hidden_size, dtype=torch.float32))
        self.kernels = "torch"  # set by Transformer.use_kernels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernels == "triton":  # one kernel instead of ~8 (decode is launch-bound)
            from moerun.ops.gpu.norm import rms_norm

            return rms_norm(x, self.scale, self.eps)
        # fp32 statistics and scale, one rounding back to the activation dtype
        t = x.float()
        t = t * torch.rsqrt(torch.mean(t**2, dim=-1, keepdim=True) + self.eps)
        return (t * self.scale).to(x.dtype)


class Linear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool = True) -> None:
        super().__init__()
        self.weight = nn.Buffer(torch.empty(out_features, in_features))
        self.bias = nn.Buffer(torch.empty(out_features)) if bias else None
        self.kernels = "torch"  # set by Transformer.use_kernels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernels == "cpu" and self.weight.dtype == torch.bfloat16:
            # bf16 weights read in place, fp32 accumulation, one rounding: like a bf16 GEMM
            return cpu.bf16_linear(x.float().contiguous(), self.weight, self.bias).to(x.dtype)
        return F.linear(x, self.weight, self.bias)


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

    @staticmethod
    def apply(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x [T, ..., d]; cos/sin [T, d/2] fp32, cast to x's dtype first as the reference does."""
        shape = (x.shape[0],) + (1,) * (x.dim() - 2) + (cos.shape[-1],)
        cos, sin = cos.reshape(shape).to(x.dtype), sin.reshape(shape).to(x.dtype)
        x1, x2 = torch.chunk(x, 2, dim=-1)
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


class AttentionBlock(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int, fused_qkv: bool) -> None:
        super().__init__()
        self.cfg, self.window = cfg, cfg.window(layer)
        self.norm = RMSNorm(cfg)
        D = cfg.hidden_size
        if fused_qkv:  # original layout: one [q; k; v] projection
            self.qkv = Linear(D, cfg.q_size + 2 * cfg.kv_size)
        else:  # HF layout: three projections
            self.q, self.k, self.v = (
                Linear(D, cfg.q_size),
                Linear(D, cfg.kv_size),
                Linear(D, cfg.kv_size),
            )
        self.sinks = nn.Buffer(torch.empty(cfg.num_attention_heads))
        self.out = Linear(cfg.q_size, D)
        self.sm_scale = 1 / math.sqrt(cfg.head_dim)

    def project(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        c = self.cfg
        if hasattr(self, "qkv"):
            q, k, v = self.qkv(t).split([c.q_size, c.kv_size, c.kv_size], dim=-1)
        else:
            q, k, v = self.q(t), self.k(t), self.v(t)
        K, G = c.num_key_value_heads, c.num_attention_heads // c.num_key_value_heads
        T, d = t.shape[0], c.head_dim
        return q.reshape(T, K, G, d), k.reshape(T, K, d), v.reshape(T, K, d)

    def forward(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        cos_sin: tuple[torch.Tensor, torch.Tensor],
        seqs: list[SeqRows],
        cache: tuple[torch.Tensor, torch.Tensor, CacheIO | PagedIO] | None = None,
    ) -> torch.Tensor:
        q, k, v = self.project(self.norm(x))
        if cache is not None and isinstance(cache[2], PagedIO):  # the Triton path (CUDA)
            from moerun.ops.gpu.attention import paged_attention

            o = paged_attention(q, k, v, cos_sin, cache, self.sinks, self.sm_scale, self.window)
            return x + self.out(o)
        q, k = Rope.apply(q, *cos_sin), Rope.apply(k, *cos_sin)  # K is cached after RoPE
        o = batch_attention(q, k, v, positions, seqs, self.sinks, self.sm_scale, self.window, cache)
        return x + self.out(o)


class Mxfp4Weight(nn.Module):
    def __init__(self, experts: int, out_features: int, in_features: int) -> None:
        super().__init__()
        groups = in_features // 32
        self.blocks = nn.Buffer(torch.empty(experts, out_features, groups, 16, dtype=torch.uint8))
        self.scales = nn.Buffer(torch.empty(experts, out_features, groups, dtype=torch.uint8))


class MLPBlock(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        E, D, I = cfg.num_experts, cfg.hidden_size, cfg.intermediate_size
        self.norm = RMSNorm(cfg)
        self.gate = Linear(D, E)
        self.mlp1_weight, self.mlp1_bias = (
            Mxfp4Weight(E, 2 * I, D),
            nn.Buffer(torch.empty(E, 2 * I)),
        )
        self.mlp2_weight, self.mlp2_bias = Mxfp4Weight(E, D, I), nn.Buffer(torch.empty(E, D))
        self.kernels = "torch"  # set by Transformer.use_kernels

    def experts(self) -> ExpertWeights:
        m1, m2 = self.mlp1_weight, self.mlp2_weight
        return ExpertWeights(
            m1.blocks, m1.scales, self.mlp1_bias, m2.blocks, m2.scales, self.mlp2_bias
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.norm(x)
        ids, weights = route(self.gate(t), self.cfg.experts_per_token, self.kernels)  # [T, A]
        experts, limit = self.experts(), self.cfg.swiglu_limit
        return moe_experts(t, ids, weights, experts, limit, self.kernels, residual=x)


class TransformerBlock(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int, fused_qkv: bool) -> None:
        super().__init__()
        self.attn = AttentionBlock(cfg, layer, fused_qkv)
        self.mlp = MLPBlock(cfg)


def resolve_kernels(kernels: str, device: str) -> str:
    """ "auto" -> "cpu" on a CPU (when the C kernels build), "triton" on CUDA; checks the rest."""
    if kernels not in KERNELS:
        raise ConfigError(f"kernels must be one of {', '.join(KERNELS)}, not {kernels!r}")
    cuda = torch.device(device).type == "cuda"
    if kernels == "auto":
        kernels = "triton" if cuda else "cpu" if cpu.available() else "torch"
    if kernels == "cpu" and (cuda or not cpu.available()):
        why = "they run on a CPU" if cuda else "they could not be built"
        raise ConfigError(f"kernels=cpu was asked for but {why}")
    if kernels == "triton":
        try:
            import triton  # noqa: F401
        except ImportError:
            raise ConfigError("kernels=triton needs the triton package") from None
        if not cuda and os.environ.get("TRITON_INTERPRET") != "1":
            raise ConfigError("kernels=triton needs device=cuda (or TRITON_INTERPRET=1)")
    return kernels


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig, fused_qkv: bool = True) -> None:
        super().__init__()
        self.cfg = cfg
        self.embedding = Embedding(cfg.vocab_size, cfg.hidden_size)
        self.block = nn.ModuleList(
            TransformerBlock(cfg, n, fused_qkv) for n in range(cfg.num_hidden_layers)
        )
        self.norm = RMSNorm(cfg)
        self.unembedding = Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.rope = Rope(cfg)

    @classmethod
    def from_checkpoint(
        cls, ckpt: Checkpoint, dtype: torch.dtype = torch.bfloat16, kernels: str = "auto",
        device: str = "cpu",
    ) -> "Transformer":  # fmt: skip
        """Adopt the checkpoint's tensors as they are. On a CPU (bf16) they stay views of the
        mmap, no copy; on CUDA each is copied from the mmap to the GPU as it is, experts packed.
        kernels: see resolve_kernels."""
        kernels = resolve_kernels(kernels, device)
        with torch.device("meta"):
            model = cls(ckpt.config, fused_qkv=ckpt.layout == "original")
        model.load_state_dict(ckpt.tensors, strict=True, assign=True)
        return model.finish_loading(dtype, kernels, device)

    def finish_loading(self, dtype: torch.dtype, kernels: str, device: str) -> "Transformer":
        # tensor by tensor: a GPU never holds two copies; floating tensors only are cast, the
        # MXFP4 blocks/scales stay uint8
        self.rope = Rope(self.cfg)  # computed, not loaded: off the meta device
        self.to(device=device)
        self.to(dtype=dtype)
        self.rope = Rope(self.cfg).to(device)  # fp32 whatever the model's dtype
        for module in self.modules():
            if isinstance(module, RMSNorm):  # the reference keeps norm scales in fp32
                module.scale = module.scale.float()
        self.use_kernels(kernels)
        return self.eval()

    def use_kernels(self, kernels: str) -> None:
        for module in self.modules():
            if isinstance(module, Linear | MLPBlock | RMSNorm):
                module.kernels = kernels

    def weight_bytes(self) -> tuple[int, int]:
        """(packed MXFP4 expert blocks + scales, everything else) in bytes."""
        sizes = [(t.dtype == torch.uint8, t.numel() * t.element_size())
                 for name, t in self.named_buffers() if not name.startswith("rope.")]  # fmt: skip
        packed = sum(size for is_packed, size in sizes if is_packed)
        return packed, sum(size for _, size in sizes) - packed

    @property
    def device(self) -> torch.device:
        return self.embedding.weight.device

    @property
    def kernels(self) -> str:
        return self.unembedding.kernels

    @property
    def dtype(self) -> torch.dtype:
        return self.embedding.weight.dtype

    def hidden(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token ids [T] of one sequence from position 0 -> final normed hidden states [T, D]."""
        positions = torch.arange(tokens.shape[0], device=tokens.device)
        return self.forward_batch(tokens, positions, [SeqRows(0, tokens.shape[0], 0)])

    def forward_batch(
        self,
        tokens: torch.Tensor,  # [N] new tokens of all sequences, concatenated
        positions: torch.Tensor,  # [N]
        seqs: list[SeqRows],
        kv: "KVCache | None" = None,
        io: dict[str, CacheIO] | None = None,  # per layer kind (full / sliding)
    ) -> torch.Tensor:  # [N, D] final normed hidden states
        cos_sin = self.rope.cos_sin(positions)
        x = self.embedding(tokens)
        for n, block in enumerate(self.block):
            cache = None
            if kv is not None and io is not None:
                cache = (kv.k[n], kv.v[n], io[self.cfg.layer_types[n]])
            x = block.attn(x, positions, cos_sin, seqs, cache)
            x = block.mlp(x)
        return self.norm(x)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.unembedding(hidden)  # [T, V], no bias, no soft-cap

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.logits(self.hidden(tokens))
