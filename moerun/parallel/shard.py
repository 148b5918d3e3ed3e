"""Which part of the model one rank holds (issue 17), and the two collectives a step needs.

Tensor parallelism (TP) over N ranks splits attention by heads (each rank its query heads and
their K/V heads, so the KV cache is per rank), the output projection by its input columns, each
expert's intermediate dimension (mlp1 by rows, mlp2 by columns, in whole 32-column MXFP4 groups),
and the unembedding by vocabulary. Expert parallelism (EP) gives each rank E/N whole experts
instead of a slice of every expert. Either way a layer ends with one all-reduce after attention
and one after the MoE; the logits are gathered so that every rank samples the same token.
Biases added after a row-split matmul (attention out, mlp2 under TP) live on rank 0 only.
"""

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from moerun.errors import ConfigError
from moerun.model.config import ModelConfig

if TYPE_CHECKING:
    from moerun.ops.backend import Ops
    from moerun.ops.experts import ExpertWeights


@dataclass(frozen=True)
class Shard:
    rank: int = 0
    size: int = 1
    expert_parallel: bool = False  # experts split whole (EP), else each expert's width (TP)
    attention_parallel: bool = True  # heads split; False: attention replicated (EP alone)

    def part(self, n: int) -> tuple[int, int]:
        """This rank's [start, stop) of n items split as evenly as possible, lower ranks first."""
        base, extra = divmod(n, self.size)
        start = self.rank * base + min(self.rank, extra)
        return start, start + base + (self.rank < extra)

    def check(self, cfg: ModelConfig) -> None:
        """ConfigError naming the problem when this model cannot be split this way."""
        n, kv = self.size, cfg.num_key_value_heads
        if n > 1 and self.attention_parallel and kv % n:
            raise ConfigError(f"tensor parallel size {n} must divide the {kv} KV heads")
        if n > 1 and self.expert_parallel and cfg.num_experts % n:
            raise ConfigError(f"expert parallel size {n} must divide the {cfg.num_experts} experts")
        if n > 1 and not self.expert_parallel and cfg.intermediate_size // 32 < n:
            raise ConfigError(f"{cfg.intermediate_size // 32} MXFP4 groups cannot feed {n} ranks")

    def heads(self, cfg: ModelConfig) -> tuple[tuple[int, int], tuple[int, int]]:
        """([q0, q1), [k0, k1)): this rank's query heads and KV heads (whole GQA groups)."""
        if not self.attention_parallel:
            return (0, cfg.num_attention_heads), (0, cfg.num_key_value_heads)
        k0, k1 = self.part(cfg.num_key_value_heads)
        g = cfg.num_attention_heads // cfg.num_key_value_heads
        return (k0 * g, k1 * g), (k0, k1)

    def local_config(self, cfg: ModelConfig) -> ModelConfig:
        """The config as this rank's attention and KV cache see it: its heads only."""
        (q0, q1), (k0, k1) = self.heads(cfg)
        return cfg.replace(num_attention_heads=q1 - q0, num_key_value_heads=k1 - k0)

    def experts(self, cfg: ModelConfig) -> tuple[int, int]:
        return self.part(cfg.num_experts) if self.expert_parallel else (0, cfg.num_experts)

    def intermediate(self, cfg: ModelConfig) -> tuple[int, int]:
        """[i0, i1) of each expert's intermediate dimension, in whole groups of 32."""
        if self.expert_parallel:
            return 0, cfg.intermediate_size
        g0, g1 = self.part(cfg.intermediate_size // 32)
        return 32 * g0, 32 * g1

    def vocab(self, cfg: ModelConfig) -> tuple[int, int]:
        return self.part(cfg.vocab_size)

    def reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum of every rank's x, in fp32 (gloo has no bf16 sum; one rounding at the end)."""
        if self.size == 1:
            return x
        total = x.float()
        dist.all_reduce(total)
        return total.to(x.dtype)

    def gather_vocab(self, logits: torch.Tensor, vocab_size: int) -> torch.Tensor:
        """[T, V_rank] -> [T, V], the ranks' slices in order (padded to equal sizes on the wire)."""
        if self.size == 1:
            return logits
        width = -(-vocab_size // self.size)
        padded = torch.zeros(logits.shape[0], width, dtype=logits.dtype, device=logits.device)
        padded[:, : logits.shape[1]] = logits
        parts = [torch.empty_like(padded) for _ in range(self.size)]
        dist.all_gather(parts, padded.contiguous())
        sizes = [Shard(r, self.size).part(vocab_size) for r in range(self.size)]
        return torch.cat([p[:, : b - a] for p, (a, b) in zip(parts, sizes, strict=True)], dim=1)


def local_experts_moe(
    ops: "Ops",
    x: torch.Tensor,  # [T, D] normed activations
    ids: torch.Tensor,  # [T, A] global expert ids
    weights: torch.Tensor,  # [T, A]
    experts: "ExpertWeights",  # this rank's experts, global ids first..first+E_rank
    limit: float,
    first: int,
) -> torch.Tensor:  # [T, D]: this rank's part of the experts' output
    """Expert parallelism: only the (token, choice) pairs routed to this rank's experts run,
    each as a one-expert row (the kernels take [P, 1] ids), summed per token in fp32."""
    E = experts.mlp1_blocks.shape[0]
    tok, slot = ((ids >= first) & (ids < first + E)).nonzero(as_tuple=True)  # [P] each
    acc = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    if tok.numel():
        local = (ids[tok, slot] - first).unsqueeze(1)  # [P, 1]
        y = ops.moe(x[tok], local, weights[tok, slot].unsqueeze(1), experts, limit)  # [P, D]
        acc.index_add_(0, tok, y.float())
    return acc.to(x.dtype)


WHOLE = Shard()  # one process holds the whole model
