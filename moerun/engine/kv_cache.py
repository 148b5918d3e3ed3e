"""Per-layer K/V storage in blocks; full and sliding layers draw on separate block pools.
The model reads and writes it through the per-step view of moerun.ops.paged.

Shapes: k[layer], v[layer] = [num_blocks, block_size, K, d] (K = kv heads, d = head dim); K is
stored after RoPE. A slot is block * block_size + offset, the index into the [-1, K, d] view.
"""

import math
from typing import TYPE_CHECKING

import torch

from moerun.config import AUTO_KV_CPU, AUTO_KV_FRACTION, AUTO_KV_RESERVE, EngineConfig
from moerun.errors import ConfigError
from moerun.model.config import SLIDING, ModelConfig

if TYPE_CHECKING:
    from moerun.model.gpt_oss import Transformer


def kv_cache_bytes(engine: EngineConfig, device: torch.device) -> int:
    """engine.kv_cache_memory; for "auto" (0) 2 GiB on a CPU, and on CUDA AUTO_KV_FRACTION of
    the memory free now (weights placed) less AUTO_KV_RESERVE for activations. On CUDA a size
    that does not fit what is free is refused here rather than failing on allocation."""
    if device.type != "cuda":
        return engine.kv_cache_memory or AUTO_KV_CPU
    free, _ = torch.cuda.mem_get_info(device)
    room = int(free * AUTO_KV_FRACTION) - AUTO_KV_RESERVE
    if engine.kv_cache_memory > room:
        raise ConfigError(
            f"kv_cache_memory={engine.kv_cache_memory / 2**30:.2f} GiB does not fit: "
            f"{free / 2**30:.2f} GiB of {device} is free once the weights are placed, "
            f"{max(room, 0) / 2**30:.2f} GiB usable for K/V"
        )
    return engine.kv_cache_memory or room


def plan_blocks(
    model: ModelConfig, engine: EngineConfig, dtype: torch.dtype, memory: int | None = None
) -> tuple[int, int]:
    """(full-layer blocks, sliding-layer blocks) that fit `memory` (engine.kv_cache_memory).

    Sliding layers keep at most ceil((W-1)/bs)+1 blocks per sequence between steps, and a step
    writes all its new positions: a block or two per sequence plus the step's token budget.
    They get exactly that for max_num_seqs requests, plus with prefix caching room for as many
    window checkpoints (the blocks a request resuming from a cached prefix needs); full layers
    get the rest.
    """
    memory = kv_cache_bytes(engine, torch.device("cpu")) if memory is None else memory
    bs = engine.block_size
    n_window = sum(t == SLIDING for t in model.layer_types)
    n_full = model.num_hidden_layers - n_window
    per_layer = 2 * bs * model.num_key_value_heads * model.head_dim * dtype.itemsize  # K and V
    window_blocks = 0
    if n_window:
        kept = math.ceil((model.sliding_window - 1) / bs) + 1
        budget = math.ceil(engine.max_num_batched_tokens / bs)
        window_blocks = engine.max_num_seqs * (kept + 2) + budget
        if engine.enable_prefix_caching:
            window_blocks += engine.max_num_seqs * kept
    left = memory - window_blocks * per_layer * n_window
    full_blocks = left // (per_layer * n_full) if n_full else 0
    need = math.ceil(engine.max_model_len / bs) if n_full else 0
    if left < 0 or full_blocks < need:
        raise ConfigError(
            f"kv_cache_memory={memory} B cannot hold one request of "
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


def placement_report(model: "Transformer", kv: KVCache) -> str:
    """One line: what the loader placed on the device and what is left."""
    device = model.device
    packed, dense = model.weight_bytes()
    cache = sum(t.numel() * t.element_size() for t in kv.k + kv.v)
    gib = lambda n: f"{n / 2**30:.2f} GiB"  # noqa: E731
    line = (f"moerun: {device}: weights {gib(packed + dense)} (experts MXFP4 {gib(packed)}, "
            f"other {gib(dense)}), KV cache {gib(cache)}")  # fmt: skip
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        line += f"; {gib(free)} of {gib(total)} still free"
    return line
