"""What one rank runs for the commands that take --tensor-parallel-size: module-level functions,
so that spawned ranks can be handed them (moerun.parallel.launch.run_ranks)."""

import resource

import torch

from moerun.parallel.shard import Shard


def load_sharded(model: str, rank: int, size: int, dtype: str, kernels: str, device: str,
                 expert_parallel: bool, attention_parallel: bool = True):  # fmt: skip
    """This rank's part of the model (moerun.model.gpt_oss.Transformer)."""
    from moerun.model.checkpoint import load_checkpoint
    from moerun.model.gpt_oss import Transformer

    shard = Shard(rank, size, expert_parallel, attention_parallel)
    ckpt = load_checkpoint(model)
    return Transformer.from_checkpoint(ckpt, getattr(torch, dtype), kernels, device, shard=shard)


def score_rank(
    rank: int, size: int, model: str, tokens: list[int], dtype: str, kernels: str, device: str,
    expert_parallel: bool, attention_parallel: bool = True,
) -> dict:  # fmt: skip
    """`moerun score` on one rank: every rank computes, rank 0's result is the answer. Also
    reports this rank's peak RSS (GiB) and the bytes it holds, to show the split."""
    from moerun.scoring import score

    m = load_sharded(model, rank, size, dtype, kernels, device, expert_parallel,
                     attention_parallel)  # fmt: skip
    result = score(m, tokens)._asdict()
    packed, dense = m.weight_bytes()
    held = torch.tensor([packed, dense, _peak_rss()], dtype=torch.float64)
    everyone = [torch.zeros_like(held) for _ in range(size)]
    torch.distributed.all_gather(everyone, held)
    result["ranks"] = [{"expert_bytes": int(h[0]), "other_bytes": int(h[1]),
                        "peak_rss_gib": round(float(h[2]), 3)} for h in everyone]  # fmt: skip
    return result


def _peak_rss() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
