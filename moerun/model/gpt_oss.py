"""The gpt-oss transformer (spec §2). Module names equal the original checkpoint's tensor names,
so loading is `load_state_dict(assign=True)` over mmap'd views: no copy, experts stay MXFP4.

Dims: T = tokens, D = hidden, K = kv heads, G = query heads per kv head, d = head dim, V = vocab.
"""

import math
from collections.abc import Callable

import torch
from torch import nn

from moerun.errors import ConfigError
from moerun.model.checkpoint import Checkpoint
from moerun.model.config import ModelConfig
from moerun.model.layers import Embedding, Linear, Mxfp4Weight, RMSNorm, Rope
from moerun.ops.backend import Ops, resolve_ops
from moerun.ops.experts import ExpertWeights
from moerun.ops.paged import LayerKV, StepCache, StepRows, scratch_cache
from moerun.parallel.shard import WHOLE, Shard, local_experts_moe
from moerun.parallel.slicing import shard_tensors

DENSE_WEIGHTS = ("bf16", "int8")  # bf16: the model's dtype, as loaded


class AttentionBlock(nn.Module):
    def __init__(
        self, cfg: ModelConfig, layer: int, fused_qkv: bool, ops: Ops, shard: Shard
    ) -> None:
        """cfg: the rank's own (its heads only, moerun.parallel.shard)."""
        super().__init__()
        self.cfg, self.window, self.ops, self.shard = cfg, cfg.window(layer), ops, shard
        self.norm = RMSNorm(cfg, ops)
        D = cfg.hidden_size
        if fused_qkv:  # original layout: one [q; k; v] projection
            self.qkv = Linear(D, cfg.q_size + 2 * cfg.kv_size, ops)
        else:  # HF layout: three projections
            self.q, self.k, self.v = (
                Linear(D, cfg.q_size, ops),
                Linear(D, cfg.kv_size, ops),
                Linear(D, cfg.kv_size, ops),
            )
        self.sinks = nn.Buffer(torch.empty(cfg.num_attention_heads))
        self.out = Linear(cfg.q_size, D, ops)
        self.sm_scale = 1 / math.sqrt(cfg.head_dim)

    def fuse_qkv(self) -> None:
        """HF layout: one [q; k; v] projection instead of three (the original layout's), one
        kernel call a layer instead of three; every output row is the same dot product."""
        parts = (self.q, self.k, self.v)
        with torch.device("meta"):
            self.qkv = Linear(1, 1, self.ops, bias=parts[0].bias is not None)
        self.qkv.weight = nn.Buffer(torch.cat([p.weight for p in parts]))
        if parts[0].bias is not None:
            self.qkv.bias = nn.Buffer(torch.cat([p.bias for p in parts]))
        del self.q, self.k, self.v

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
        x: torch.Tensor,  # [T, D]
        cos_sin: tuple[torch.Tensor, torch.Tensor],  # [T, d/2] each
        layer: LayerKV,
        rows: StepRows,
    ) -> torch.Tensor:
        q, k, v = self.project(self.norm(x))
        o = self.ops.attention(q, k, v, cos_sin, layer, rows, self.sinks, self.sm_scale,
                               self.window)  # fmt: skip
        if self.shard.attention_parallel:  # each rank's heads: a partial sum of the projection
            return x + self.shard.reduce(self.out(o))
        return x + self.out(o)


class MLPBlock(nn.Module):
    def __init__(self, cfg: ModelConfig, ops: Ops, shard: Shard) -> None:
        super().__init__()
        self.cfg, self.ops, self.shard = cfg, ops, shard
        (e0, e1), (i0, i1) = shard.experts(cfg), shard.intermediate(cfg)
        E, D, I = e1 - e0, cfg.hidden_size, i1 - i0  # this rank's experts and width
        self.norm = RMSNorm(cfg, ops)
        self.gate = Linear(D, cfg.num_experts, ops)  # every rank routes over all experts
        self.mlp1_weight, self.mlp1_bias = (
            Mxfp4Weight(E, 2 * I, D),
            nn.Buffer(torch.empty(E, 2 * I)),
        )
        self.mlp2_weight, self.mlp2_bias = Mxfp4Weight(E, D, I), nn.Buffer(torch.empty(E, D))

    def experts(self) -> ExpertWeights:
        m1, m2 = self.mlp1_weight, self.mlp2_weight
        return ExpertWeights(
            m1.blocks, m1.scales, self.mlp1_bias, m2.blocks, m2.scales, self.mlp2_bias
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.norm(x)
        ids, weights = self.ops.route(self.gate(t), self.cfg.experts_per_token)  # [T, A]
        limit = self.cfg.swiglu_limit
        if self.shard.size == 1:
            return self.ops.moe(t, ids, weights, self.experts(), limit, residual=x)
        if self.shard.expert_parallel:
            part = local_experts_moe(self.ops, t, ids, weights, self.experts(), limit,
                                     self.shard.experts(self.cfg)[0])  # fmt: skip
        else:  # every expert, this rank's slice of its width
            part = self.ops.moe(t, ids, weights, self.experts(), limit)
        return x + self.shard.reduce(part)


class TransformerBlock(nn.Module):
    def __init__(
        self, cfg: ModelConfig, layer: int, fused_qkv: bool, ops: Ops, shard: Shard
    ) -> None:
        super().__init__()
        self.attn = AttentionBlock(shard.local_config(cfg), layer, fused_qkv, ops, shard)
        self.mlp = MLPBlock(cfg, ops, shard)


class Transformer(nn.Module):
    def __init__(
        self, cfg: ModelConfig, fused_qkv: bool = True, ops: Ops | None = None,
        shard: Shard = WHOLE,
    ) -> None:  # fmt: skip
        """ops: the backend every layer calls (moerun.ops.backend); the torch reference if None.
        shard: the part of the model this rank holds (moerun.parallel); self.cfg is then the
        rank's view (its heads, so the engine sizes its KV cache), vocab_size the whole one."""
        super().__init__()
        shard.check(cfg)
        self.cfg, self.shard = shard.local_config(cfg), shard
        self.ops = ops = ops or resolve_ops("torch")
        self.embedding = Embedding(cfg.vocab_size, cfg.hidden_size)
        self.block = nn.ModuleList(
            TransformerBlock(cfg, n, fused_qkv, ops, shard) for n in range(cfg.num_hidden_layers)
        )
        self.norm = RMSNorm(cfg, ops)
        v0, v1 = shard.vocab(cfg)
        self.unembedding = Linear(cfg.hidden_size, v1 - v0, ops, bias=False)
        self.rope = Rope(cfg)

    @classmethod
    def from_checkpoint(
        cls, ckpt: Checkpoint, dtype: torch.dtype = torch.bfloat16, kernels: str = "auto",
        device: str = "cpu", dense_weights: str = "bf16", mmap_weights: bool = False,
        shard: Shard = WHOLE,
    ) -> "Transformer":  # fmt: skip
        """Adopt the checkpoint's tensors as they are. On a CPU (bf16) they stay views of the
        mmap, no copy; on CUDA each is copied from the mmap to the GPU as it is, experts packed.
        kernels: see moerun.ops.backend.resolve_kernels. dense_weights "int8": the attention
        projections and the unembedding quantized to 8 bits at load (quantize_dense). On a CPU
        the weights are then copied into process memory (own_weights) unless mmap_weights."""
        if dense_weights not in DENSE_WEIGHTS:
            raise ConfigError(f"dense_weights must be bf16 or int8, not {dense_weights!r}")
        if dense_weights == "int8" and torch.device(device).type != "cpu":
            raise ConfigError("dense_weights=int8 runs on a CPU only (no GPU kernel yet)")
        ops = resolve_ops(kernels, device)
        with torch.device("meta"):
            model = cls(ckpt.config, fused_qkv=ckpt.layout == "original", ops=ops, shard=shard)
        tensors = shard_tensors(ckpt.tensors, ckpt.config, shard, ckpt.release_pages)
        model.load_state_dict(tensors, strict=True, assign=True)
        model = model.finish_loading(dtype, device)
        own = torch.device(device).type == "cpu" and not mmap_weights
        if own and ckpt.layout == "hf":  # copied anyway: fused as they are copied
            for n, block in enumerate(model.block):
                block.attn.fuse_qkv()
                for part in "qkv":
                    ckpt.release_pages(f"block.{n}.attn.{part}.weight")
        if dense_weights == "int8":
            model.quantize_dense(ckpt.release_pages)
        if own:
            model.own_weights(ckpt)
        return model

    def own_weights(self, ckpt: Checkpoint) -> None:
        """Copy every weight still viewing the checkpoint's mmap into process memory, one tensor
        at a time, each source's pages released after its copy (the RSS stays one copy). The
        kernels stream these copies measurably faster than the file's pages (MoE decode 1.3-1.5x
        on a 2-core Xeon; bench/README). The embedding stays mapped: a step reads one row a
        token, and mapped, only the rows ever used take memory."""
        for name, t in list(self.named_buffers()):
            src = ckpt.tensors.get(name)
            if src is None or name == "embedding.weight" or t.data_ptr() != src.data_ptr():
                continue
            module, _, leaf = name.rpartition(".")
            setattr(self.get_submodule(module), leaf, nn.Buffer(t.clone()))
            ckpt.release_pages(name)

    def quantize_dense(self, release: Callable[[str], None] = lambda name: None) -> None:
        """Attention projections and the unembedding to 8 bits (moerun.ops.int8), one matrix at
        a time, each source released (`release(name)`) as soon as it is converted, so the peak
        memory stays near the final one. The router (tiny) and the embedding (one row read per
        token) keep their dtype."""
        for name, module in self.named_modules():
            if isinstance(module, Linear) and not name.endswith("mlp.gate"):
                module.quantize_int8()
                release(f"{name}.weight")

    def finish_loading(self, dtype: torch.dtype, device: str | torch.device) -> "Transformer":
        # tensor by tensor: a GPU never holds two copies; floating tensors only are cast, the
        # MXFP4 blocks/scales stay uint8
        self.rope = Rope(self.cfg)  # computed, not loaded: off the meta device
        self.to(device=device)
        self.to(dtype=dtype)
        self.rope = Rope(self.cfg).to(device)  # fp32 whatever the model's dtype
        for module in self.modules():
            if isinstance(module, RMSNorm):  # the reference keeps norm scales in fp32
                module.scale = module.scale.float()
        return self.eval()

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
    def dtype(self) -> torch.dtype:
        return self.embedding.weight.dtype

    def hidden(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token ids [T] of one sequence from position 0 -> final normed hidden states [T, D],
        through a throwaway paged cache (the same K/V path as the engine's steps)."""
        c = self.cfg
        cache = scratch_cache(c.num_hidden_layers, tokens.shape[0], c.num_key_value_heads,
                              c.head_dim, self.dtype, tokens.device)  # fmt: skip
        return self.forward_batch(tokens, cache)

    def forward_batch(
        self,
        tokens: torch.Tensor,  # [N] new tokens of all sequences, concatenated
        cache: StepCache,  # per layer: the paged K/V and this step's addressing
    ) -> torch.Tensor:  # [N, D] final normed hidden states
        cos_sin = self.rope.cos_sin(cache.rows.positions)
        x = self.embedding(tokens)
        for block, layer in zip(self.block, cache.layers, strict=True):
            x = block.attn(x, cos_sin, layer, cache.rows)
            x = block.mlp(x)
        return self.norm(x)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        # [T, V], no bias, no soft-cap; a rank computes its vocabulary slice, then all gather
        return self.shard.gather_vocab(self.unembedding(hidden), self.cfg.vocab_size)

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.logits(self.hidden(tokens))
