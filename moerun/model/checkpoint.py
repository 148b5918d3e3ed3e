"""Find, check and memory-map a gpt-oss checkpoint in either layout (spec §3.2, §3.3).

Tensors come back under the original layout's names (`block.N.attn.qkv.weight`, ...), the names
the model's modules use; the HF layout's split projections come back as `block.N.attn.{q,k,v}.*`.
Nothing is copied: every tensor is a view of the mmap'd file, experts stay packed MXFP4 (uint8).
"""

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from moerun.errors import CheckpointError, ConfigError
from moerun.model.config import ModelConfig
from moerun.model.safetensors_io import SafetensorsFile, TensorSpec

Layout = Literal["hf", "original"]
INDEX_FILE = "model.safetensors.index.json"
# What to fetch from the Hub: the HF layout (the original/ copy would double the download).
HUB_PATTERNS = ["config.json", "generation_config.json", "*.safetensors", INDEX_FILE,
                "tokenizer*", "special_tokens_map.json", "chat_template.jinja"]  # fmt: skip


def expected_tensors(cfg: ModelConfig, layout: Layout) -> dict[str, TensorSpec]:
    """Our tensor name -> the checkpoint's name, dtype and shape, built from the config."""
    D, V, E, I2 = cfg.hidden_size, cfg.vocab_size, cfg.num_experts, 2 * cfg.intermediate_size
    G1, G2 = D // 32, cfg.intermediate_size // 32  # MXFP4 blocks per row of mlp1 / mlp2
    hf = layout == "hf"
    out: dict[str, TensorSpec] = {}

    def add(ours: str, hf_name: str, dtype: str, shape: tuple[int, ...]) -> None:
        out[ours] = TensorSpec(hf_name if hf else ours, dtype, shape)

    add("embedding.weight", "model.embed_tokens.weight", "BF16", (V, D))
    add("norm.scale", "model.norm.weight", "BF16", (D,))
    add("unembedding.weight", "lm_head.weight", "BF16", (V, D))
    for n in range(cfg.num_hidden_layers):
        b, h = f"block.{n}", f"model.layers.{n}"
        add(f"{b}.attn.norm.scale", f"{h}.input_layernorm.weight", "BF16", (D,))
        if hf:
            for p, rows in (("q", cfg.q_size), ("k", cfg.kv_size), ("v", cfg.kv_size)):
                add(f"{b}.attn.{p}.weight", f"{h}.self_attn.{p}_proj.weight", "BF16", (rows, D))
                add(f"{b}.attn.{p}.bias", f"{h}.self_attn.{p}_proj.bias", "BF16", (rows,))
        else:
            qkv = cfg.q_size + 2 * cfg.kv_size
            add(f"{b}.attn.qkv.weight", "", "BF16", (qkv, D))
            add(f"{b}.attn.qkv.bias", "", "BF16", (qkv,))
        add(f"{b}.attn.sinks", f"{h}.self_attn.sinks", "BF16", (cfg.num_attention_heads,))
        add(f"{b}.attn.out.weight", f"{h}.self_attn.o_proj.weight", "BF16", (D, cfg.q_size))
        add(f"{b}.attn.out.bias", f"{h}.self_attn.o_proj.bias", "BF16", (D,))
        add(f"{b}.mlp.norm.scale", f"{h}.post_attention_layernorm.weight", "BF16", (D,))
        add(f"{b}.mlp.gate.weight", f"{h}.mlp.router.weight", "BF16", (E, D))
        add(f"{b}.mlp.gate.bias", f"{h}.mlp.router.bias", "BF16", (E,))
        x = f"{h}.mlp.experts"
        add(f"{b}.mlp.mlp1_weight.blocks", f"{x}.gate_up_proj_blocks", "U8", (E, I2, G1, 16))
        add(f"{b}.mlp.mlp1_weight.scales", f"{x}.gate_up_proj_scales", "U8", (E, I2, G1))
        add(f"{b}.mlp.mlp1_bias", f"{x}.gate_up_proj_bias", "BF16", (E, I2))
        add(f"{b}.mlp.mlp2_weight.blocks", f"{x}.down_proj_blocks", "U8", (E, D, G2, 16))
        add(f"{b}.mlp.mlp2_weight.scales", f"{x}.down_proj_scales", "U8", (E, D, G2))
        add(f"{b}.mlp.mlp2_bias", f"{x}.down_proj_bias", "BF16", (E, D))
    return out


@dataclass
class Checkpoint:
    """A checked, memory-mapped checkpoint: config plus tensors under our names."""

    directory: Path
    layout: Layout
    config: ModelConfig
    tensors: dict[str, torch.Tensor]
    stop_ids: tuple[int, ...]  # generation_config.json's eos_token_id: where generation ends
    # our name -> (file, its name there): for release_pages
    sources: dict[str, tuple[SafetensorsFile, str]] = field(default_factory=dict)

    def release_pages(self, name: str) -> None:
        """The mmap'd pages of tensor `name` (if it is one of ours) no longer count in this
        process's memory."""
        if name in self.sources:
            file, theirs = self.sources[name]
            file.release(theirs)

    @property
    def repo_root(self) -> Path:
        """Where tokenizer.json and generation_config.json sit: next to HF weights, one level
        above original/."""
        return repo_root(self.directory)


def resolve(model: str | Path) -> Path:
    """A local folder as is; otherwise a Hugging Face id, downloaded or taken from the cache.
    ("demo" is resolved a layer up, moerun.demo.weights.resolve_model: it writes checkpoints.)"""
    path = Path(model).expanduser()
    if path.exists():
        return path
    name = str(model)
    if name.count("/") != 1 or name.startswith((".", "/")):
        raise CheckpointError(
            f"model {name!r}: no such folder, and not a Hugging Face id (org/name)"
        )
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(name, allow_patterns=HUB_PATTERNS))
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError) as online_error:
        try:  # offline: whatever a previous download left in the cache
            return Path(snapshot_download(name, allow_patterns=HUB_PATTERNS, local_files_only=True))
        except (LocalEntryNotFoundError, OSError):
            raise CheckpointError(
                f"model {name!r}: not a local folder, not in the Hugging Face cache, and the "
                f"download failed ({type(online_error).__name__})"
            ) from None


def detect_layout(path: Path) -> tuple[Path, Layout, ModelConfig]:
    """HF files at the root win; else an original/ folder (or a folder that is one)."""
    candidates = (
        [(path, _read_json(path / "config.json"))] if (path / "config.json").exists() else []
    )
    if (path / "original" / "config.json").exists():
        candidates.append((path / "original", _read_json(path / "original" / "config.json")))
    if not candidates:
        raise CheckpointError(f"{path}: no config.json and no original/config.json")
    for folder, data in candidates:
        if not any(folder.glob("*.safetensors")):
            continue
        if "num_local_experts" in data or "model_type" in data:
            _check_quantization(folder, data)
            return folder, "hf", ModelConfig.from_hf(data)
        return folder, "original", ModelConfig.from_original(data)
    raise CheckpointError(f"{path}: found a config but no *.safetensors weights next to it")


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot read {path}: {e}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} is not a JSON object")
    return data


def _check_quantization(folder: Path, data: dict) -> None:
    quant = data.get("quantization_config")
    if not isinstance(quant, dict):
        raise ConfigError(
            f"{folder}/config.json: no quantization_config; moerun reads MXFP4 checkpoints"
        )
    method = quant.get("quant_method")
    if method != "mxfp4":
        raise ConfigError(
            f"{folder}/config.json: quantization_config.quant_method {method!r} is not supported "
            "(expected 'mxfp4')"
        )


def _open_files(folder: Path) -> list[SafetensorsFile]:
    index = folder / INDEX_FILE
    if index.exists():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index}: no weight_map")
        names = sorted(set(weight_map.values()))
        missing = [n for n in names if not (folder / n).exists()]
        if missing:
            raise CheckpointError(f"{index} lists shard(s) that do not exist: {missing}")
    else:
        names = sorted(p.name for p in folder.glob("*.safetensors"))
    return [SafetensorsFile(folder / n) for n in names]


def load_checkpoint(model: str | Path) -> Checkpoint:
    folder, layout, cfg = detect_layout(resolve(model))
    found: dict[str, SafetensorsFile] = {}
    for f in _open_files(folder):
        for name in f.names():
            if name in found:
                raise CheckpointError(
                    f"tensor {name} appears in both {found[name].path} and {f.path}"
                )
            found[name] = f
    expected = expected_tensors(cfg, layout)
    tensors: dict[str, torch.Tensor] = {}
    sources: dict[str, tuple[SafetensorsFile, str]] = {}
    for ours, spec in expected.items():
        if spec.name not in found:
            n_missing = sum(s.name not in found for s in expected.values())
            raise CheckpointError(
                f"{folder}: tensor {spec.name} is missing ({n_missing} missing in all)"
            )
        got = found[spec.name].spec(spec.name)
        if (got.dtype, got.shape) != (spec.dtype, spec.shape):
            raise CheckpointError(
                f"{found[spec.name].path}: tensor {spec.name} is {got.dtype}{list(got.shape)}, "
                f"expected {spec.dtype}{list(spec.shape)} for this config"
            )
        tensors[ours] = found[spec.name].tensor(spec.name)
        sources[ours] = (found[spec.name], spec.name)
    unexpected = sorted(set(found) - {s.name for s in expected.values()})
    if unexpected:
        more = f" and {len(unexpected) - 1} more" if len(unexpected) > 1 else ""
        raise CheckpointError(f"{folder}: unexpected tensor {unexpected[0]}{more} for this config")
    return Checkpoint(folder, layout, cfg, tensors, _stop_ids(repo_root(folder), cfg), sources)


def repo_root(folder: Path) -> Path:
    return folder.parent if folder.name == "original" else folder


def _stop_ids(root: Path, cfg: ModelConfig) -> tuple[int, ...]:
    """eos_token_id from generation_config.json, else the spec's three. (config.json's single
    eos_token_id, <|return|>, would miss <|call|>.)"""
    path = root / "generation_config.json"
    ids = _read_json(path).get("eos_token_id") if path.exists() else None
    return cfg.stop_ids() if ids is None else cfg.stop_ids(ids)
