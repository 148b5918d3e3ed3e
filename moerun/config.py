"""EngineConfig: how the engine runs a model (device, dtype, memory budget, batching limits)."""

import re
from dataclasses import dataclass

from moerun.ops.backend import KERNELS

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}  # fmt: skip


def parse_size(value: str | int) -> int:
    """'2GiB', '512 MiB', '1.5GB', 1048576 -> bytes."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(value))
    if not match or match.group(2).lower() not in _UNITS:
        raise ValueError(f"cannot read {value!r} as a size (examples: 2GiB, 512MiB, 1.5GB)")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


# kv_cache_memory="auto": 2 GiB on a CPU; on CUDA this fraction of the memory free once the
# weights are placed, less AUTO_KV_RESERVE for activations and CUDA graphs
AUTO_KV_FRACTION, AUTO_KV_RESERVE, AUTO_KV_CPU = 0.9, 2 * 2**30, 2 * 2**30


@dataclass(frozen=True)
class EngineConfig:
    model: str
    device: str = "cpu"
    dtype: str = "bfloat16"
    max_model_len: int = 8192  # prompt + generated tokens of one request
    # bytes for K/V of all layers (a size such as "2GiB" is parsed); "auto", stored as 0: AUTO_KV_*
    kv_cache_memory: int | str = "auto"
    block_size: int = 16  # tokens per KV block
    max_num_seqs: int = 64  # requests running at once
    # tokens per step, decodes plus prefill chunks; 0 = 512 on a CPU (prefill is compute-bound
    # there: bigger chunks only delay decodes), 2048 on CUDA (a 1k prompt in one step)
    max_num_batched_tokens: int = 0
    # "cpu" (C kernels), "triton" (CUDA kernels), "torch" (reference ops); "auto": cpu on a CPU
    # when the C kernels build, triton on CUDA
    kernels: str = "auto"
    enforce_eager: bool = False  # Triton path: no CUDA graphs for decode steps
    # reuse the K/V of earlier requests' prompts (and finished requests' tokens) that a new
    # request starts with (engine/block_manager.py)
    enable_prefix_caching: bool = True
    # "int8": attention projections and unembedding quantized to 8 bits at load (ops/int8.py)
    dense_weights: str = "bf16"
    # CPU: leave the weights in the mmap'd checkpoint (lazy, page cache shared between
    # processes) instead of copying them into process memory at load, which decodes faster
    mmap_weights: bool = False
    # ranks the model is split over (moerun.parallel); experts whole per rank with
    # expert_parallel, else each expert's width
    tensor_parallel_size: int = 1
    expert_parallel: bool = False

    def __post_init__(self) -> None:
        auto = isinstance(self.kv_cache_memory, str) and self.kv_cache_memory.strip() == "auto"
        size = 0 if auto else parse_size(self.kv_cache_memory)
        if not auto and size < 1:
            raise ValueError(f"kv_cache_memory must be positive or 'auto', got {size}")
        object.__setattr__(self, "kv_cache_memory", size)
        if self.dtype not in ("bfloat16", "float32"):
            raise ValueError(f"dtype must be bfloat16 or float32, not {self.dtype!r}")
        if self.kernels not in KERNELS:
            raise ValueError(f"kernels must be one of {', '.join(KERNELS)}, not {self.kernels!r}")
        if self.dense_weights not in ("bf16", "int8"):
            raise ValueError(f"dense_weights must be bf16 or int8, not {self.dense_weights!r}")
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"device must be cpu or cuda, not {self.device!r}")
        if self.max_num_batched_tokens == 0:
            auto = 2048 if self.device == "cuda" else 512
            object.__setattr__(self, "max_num_batched_tokens", auto)
        for name in ("max_model_len", "block_size", "max_num_seqs",
                     "max_num_batched_tokens", "tensor_parallel_size"):  # fmt: skip
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
