"""Write random-weight gpt-oss checkpoints in the exact on-disk layouts, one tensor at a time.

Values depend only on (seed, tensor name), so the `hf` and `original` copies written by
`--layout both` hold the same model. Scales keep activations in a realistic range: attention
logits of a few units, some SwiGLU gates past the clamp at 7, next-token logits with std ~3.
"""

import json
import math
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from moerun.model.checkpoint import INDEX_FILE, Layout, expected_tensors
from moerun.model.config import ModelConfig
from moerun.model.safetensors_io import TensorSpec, write_safetensors
from moerun.ops.mxfp4 import FP4_VALUES

if TYPE_CHECKING:
    from moerun.model.gpt_oss import Transformer

DEFAULT_SHARD_BYTES = 4_800_000_000  # what the HF converter uses
_CHUNK = 1 << 22  # random values drawn per slice
Producer = Callable[[str, TensorSpec], torch.Tensor]  # (our name, checkpoint spec) -> value
_FP4_RMS = math.sqrt(sum(v * v for v in FP4_VALUES) / len(FP4_VALUES))  # of uniform random codes


def _generator(seed: int, name: str) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))


def _normal(shape: tuple[int, ...], std: float, mean: float, g: torch.Generator) -> torch.Tensor:
    """bf16 N(mean, std^2), drawn in slices so no full-size fp32 temporary exists."""
    out = torch.empty(shape, dtype=torch.bfloat16)
    flat = out.view(-1)
    for start in range(0, flat.numel(), _CHUNK):
        n = min(_CHUNK, flat.numel() - start)
        flat[start : start + n] = torch.randn(n, generator=g) * std + mean
    return out


def _scale_center(target_std: float) -> int:
    """The E8M0 byte that gives uniform random codes `target_std`."""
    return 127 + round(math.log2(target_std / _FP4_RMS))


def _mxfp4_scales(shape: tuple[int, ...], target_std: float, g: torch.Generator) -> torch.Tensor:
    """E8M0 bytes around _scale_center, +-1."""
    center = _scale_center(target_std)
    return (center + torch.randint(-1, 2, shape, generator=g)).to(torch.uint8)


def _stats(cfg: ModelConfig, name: str) -> tuple[str, float, float]:
    """(kind, std, mean) of one tensor by our name: kind "blocks" (uniform random codes),
    "scales" (E8M0 bytes giving weights of that std) or "normal"."""
    inv_d = 1 / math.sqrt(cfg.hidden_size)
    leaf = name.split(".", 2)[-1] if name.startswith("block.") else name
    if leaf.endswith(".blocks"):
        return "blocks", 0.0, 0.0
    if leaf.endswith(".scales"):  # mlp1: gates reach past the clamp; mlp2: outputs ~1
        std = 3 * inv_d if "mlp1" in leaf else 0.3 / math.sqrt(cfg.intermediate_size)
        return "scales", std, 0.0
    std_mean = {
        "embedding.weight": (1.0, 0.0),
        "unembedding.weight": (3 * inv_d, 0.0),
        "attn.qkv.weight": (inv_d, 0.0),
        "attn.out.weight": (1 / math.sqrt(cfg.q_size), 0.0),
        "attn.sinks": (1.0, 0.0),
        "mlp.gate.weight": (2 * inv_d, 0.0),
        "mlp.gate.bias": (0.5, 0.0),
        "mlp.mlp1_bias": (0.5, 0.0),
    }
    if leaf.endswith("norm.scale"):
        return "normal", 0.2, 1.0
    return "normal", *std_mean.get(leaf, (0.1, 0.0))  # biases


def synth_tensor(cfg: ModelConfig, name: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """The random value of one tensor, addressed by our (original-layout) name."""
    g = _generator(seed, name)
    kind, std, mean = _stats(cfg, name)
    if kind == "blocks":
        return torch.randint(0, 256, shape, generator=g, dtype=torch.uint8)
    if kind == "scales":
        return _mxfp4_scales(shape, std, g)
    return _normal(shape, std, mean, g)


@torch.no_grad()
def fill_random(model: torch.nn.Module, cfg: ModelConfig, seed: int = 0) -> None:
    """Random values of the same distributions, drawn in place wherever the model's buffers
    live: a 120b-shaped model built directly in GPU memory, no checkpoint, no host copy. The
    model uses our (original-layout) names; a device generator gives other values than
    synth_tensor, from the same distributions."""
    for name, t in model.named_buffers():
        if name.startswith("rope."):  # computed, not a weight
            continue
        g = torch.Generator(t.device).manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
        kind, std, mean = _stats(cfg, name)
        if kind == "blocks":
            t.random_(0, 256, generator=g)
        elif kind == "scales":
            center = _scale_center(std)
            t.random_(center - 1, center + 2, generator=g)
        else:
            t.normal_(mean, std, generator=g)


def _produce(cfg: ModelConfig, ours: str, spec: TensorSpec, seed: int) -> torch.Tensor:
    """Split q/k/v (HF layout) are row slices of the fused qkv the original layout stores."""
    parts = ours.split(".")
    if len(parts) == 5 and parts[2] == "attn" and parts[3] in ("q", "k", "v"):
        fused = ".".join(parts[:3] + ["qkv", parts[4]])
        rows = cfg.q_size + 2 * cfg.kv_size
        full = synth_tensor(cfg, fused, (rows, *spec.shape[1:]), seed)
        start = {"q": 0, "k": cfg.q_size, "v": cfg.q_size + cfg.kv_size}[parts[3]]
        return full[start : start + spec.shape[0]]
    return synth_tensor(cfg, ours, spec.shape, seed)


def _shards(specs: list[TensorSpec], shard_bytes: int) -> list[list[TensorSpec]]:
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in specs:
        if shards[-1] and size + spec.nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += spec.nbytes
    return shards


def write_layout(
    cfg: ModelConfig, out: Path, layout: Layout, seed: int = 0,
    shard_bytes: int = DEFAULT_SHARD_BYTES, produce: Producer | None = None,
) -> int:  # fmt: skip
    """One layout into `out`; returns bytes of tensor data written. `produce(ours, spec)` gives
    each tensor's value (default: the random one of `seed`)."""
    produce = produce or (lambda ours, spec: _produce(cfg, ours, spec, seed))
    out.mkdir(parents=True, exist_ok=True)
    expected = expected_tensors(cfg, layout)
    ours_of = {spec.name: ours for ours, spec in expected.items()}
    shards = _shards(list(expected.values()), shard_bytes)
    if layout == "hf":
        names = [f"model-{i:05d}-of-{len(shards) - 1:05d}.safetensors" for i in range(len(shards))]
        (out / "config.json").write_text(json.dumps(cfg.to_hf(), indent=2) + "\n")
        gen = json.dumps(cfg.generation_config(), indent=2) + "\n"
        (out / "generation_config.json").write_text(gen)
    else:
        n = len(shards)
        names = [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(n)]
        names = ["model.safetensors"] if n == 1 else names
        (out / "config.json").write_text(json.dumps(cfg.to_original(), indent=2) + "\n")
        u8 = {True: "UE8", False: "FP4"}  # dtypes.json labels MXFP4 scales / blocks
        dtypes = {s.name: u8[s.name.endswith("scales")] if s.dtype == "U8" else s.dtype
                  for s in expected.values()}  # fmt: skip
        (out / "dtypes.json").write_text(json.dumps(dtypes, indent=2) + "\n")
    total = 0
    for name, shard in zip(names, shards, strict=True):
        write_safetensors(out / name, shard, lambda s: produce(ours_of[s.name], s))
        total += sum(s.nbytes for s in shard)
    if layout == "hf" or len(shards) > 1:
        weight_map = {s.name: n for n, shard in zip(names, shards, strict=True) for s in shard}
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    return total


def synth(
    cfg: ModelConfig,
    out: str | Path,
    layout: str = "both",
    seed: int = 0,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
) -> Path:
    """`both` mirrors the Hub: HF files at the root, the original layout under original/."""
    out = Path(out)
    if layout in ("hf", "both"):
        write_layout(cfg, out, "hf", seed, shard_bytes)
    if layout in ("original", "both"):
        write_layout(
            cfg, out / "original" if layout == "both" else out, "original", seed, shard_bytes
        )
    if layout not in ("hf", "original", "both"):
        raise ValueError(f"layout must be hf, original or both, not {layout!r}")
    return out


def write_checkpoint(
    cfg: ModelConfig, out: str | Path, tensors: dict[str, torch.Tensor], layout: Layout = "hf",
    shard_bytes: int = DEFAULT_SHARD_BYTES,
) -> Path:  # fmt: skip
    """Given values (a trained model) in the real layout: `tensors` under our names for that
    layout (expected_tensors), experts already packed MXFP4."""
    out = Path(out)
    write_layout(cfg, out, layout, shard_bytes=shard_bytes, produce=lambda ours, _: tensors[ours])
    return out


def random_model(
    cfg: ModelConfig, dtype: torch.dtype = torch.bfloat16, kernels: str = "auto",
    device: str = "cpu", seed: int = 0,
) -> "Transformer":  # fmt: skip
    """A random-weight model allocated where it runs (experts packed MXFP4), for benchmarks of
    shapes no checkpoint on this disk has."""
    from moerun.model.gpt_oss import Transformer
    from moerun.ops.backend import resolve_ops

    ops = resolve_ops(kernels, device)
    with torch.device("meta"):
        model = Transformer(cfg, fused_qkv=True, ops=ops)
    model.to(dtype)  # on meta: no memory, but to_empty then allocates bf16, not fp32
    model.to_empty(device=device)
    fill_random(model, cfg, seed)
    return model.finish_loading(dtype, device)
