"""Per-layer K/V storage in blocks; full and sliding layers draw on separate block pools.

Shapes: k[layer], v[layer] = [num_blocks, block_size, K, d] (K = kv heads, d = head dim); K is
stored after RoPE. A slot is block * block_size + offset, the index into the [-1, K, d] view.
"""

import math

import torch

from moerun.config import EngineConfig
from moerun.errors import ConfigError
from moerun.model.config import SLIDING, ModelConfig


def plan_blocks(model: ModelConfig, engine: EngineConfig, dtype: torch.dtype) -> tuple[int, int]:
    """(full-layer blocks, sliding-layer blocks) that fit engine.kv_cache_memory.

    Sliding layers need at most ceil((W-1)/bs)+1 blocks per sequence between steps, plus the
    positions a step writes; they get exactly that for max_num_seqs requests, full layers the rest.
    """
    bs = engine.block_size
    n_window = sum(t == SLIDING for t in model.layer_types)
    n_full = model.num_hidden_layers - n_window
    per_layer = 2 * bs * model.num_key_value_heads * model.head_dim * dtype.itemsize  # K and V
    window_blocks = 0
    if n_window:
        per_seq = 2 * (math.ceil((model.sliding_window - 1) / bs) + 1)  # kept + written
        window_blocks = engine.max_num_seqs * per_seq
    left = engine.kv_cache_memory - window_blocks * per_layer * n_window
    full_blocks = left // (per_layer * n_full) if n_full else 0
    need = math.ceil(engine.max_model_len / bs) if n_full else 0
    if left < 0 or full_blocks < need:
        raise ConfigError(
            f"kv_cache_memory={engine.kv_cache_memory} B cannot hold one request of "
            f"max_model_len={engine.max_model_len} (needs about "
            f"{need * per_layer * n_full + window_blocks * per_layer * n_window} B)"
        )
    return full_blocks, window_blocks


class KVCache:
    def __init__(
        self, model: ModelConfig, full_blocks: int, window_blocks: int, block_size: int,
        dtype: torch.dtype, device: str = "cpu",
    ) -> None:  # fmt: skip
        self.block_size = block_size
        shape = (block_size, model.num_key_value_heads, model.head_dim)
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []
        for kind in model.layer_types:
            n = window_blocks if kind == SLIDING else full_blocks
            self.k.append(torch.zeros((n, *shape), dtype=dtype, device=device))
            self.v.append(torch.zeros((n, *shape), dtype=dtype, device=device))
