"""ModelConfig: the gpt-oss hyper-parameters, read from either checkpoint layout (spec §1)."""

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from moerun.errors import ConfigError

SLIDING, FULL = "sliding_attention", "full_attention"

# original/config.json's keys: exactly the reference ModelConfig's fields, which ours share
ORIGINAL_KEYS = (
    "num_hidden_layers", "num_experts", "experts_per_token", "vocab_size", "hidden_size",
    "intermediate_size", "swiglu_limit", "head_dim", "num_attention_heads",
    "num_key_value_heads", "sliding_window", "initial_context_length", "rope_theta",
    "rope_scaling_factor", "rope_ntk_alpha", "rope_ntk_beta",
)  # fmt: skip


# <|return|>, <|endoftext|>, <|call|>: generation_config.json's eos_token_id (spec §1.2), the
# stop ids when a checkpoint ships no generation_config.json
EOS_TOKEN_IDS = (200002, 199999, 200012)


@dataclass(frozen=True)
class ModelConfig:
    """gpt-oss architecture; defaults are gpt-oss-120b. Validated on construction."""

    num_hidden_layers: int = 36
    num_experts: int = 128
    experts_per_token: int = 4
    vocab_size: int = 201088
    hidden_size: int = 2880
    intermediate_size: int = 2880
    swiglu_limit: float = 7.0
    head_dim: int = 64
    num_attention_heads: int = 64
    num_key_value_heads: int = 8
    sliding_window: int = 128
    initial_context_length: int = 4096
    rope_theta: float = 150000.0
    rope_scaling_factor: float = 32.0
    rope_ntk_alpha: float = 1.0  # HF beta_slow
    rope_ntk_beta: float = 32.0  # HF beta_fast
    rope_truncate: bool = False  # HF YaRN `truncate`; gpt-oss is trained with False
    rms_norm_eps: float = 1e-5
    # None = the gpt-oss rule: even layers slide, odd layers attend to everything
    layer_types: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.layer_types is None:
            alternating = tuple(
                SLIDING if i % 2 == 0 else FULL for i in range(self.num_hidden_layers)
            )
            object.__setattr__(self, "layer_types", alternating)
        else:
            object.__setattr__(self, "layer_types", tuple(self.layer_types))
        self._validate()

    def _validate(self) -> None:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ConfigError(f"invalid model config: {msg}")

        for name in ("num_hidden_layers", "num_experts", "experts_per_token", "vocab_size",
                     "hidden_size", "intermediate_size", "head_dim", "num_attention_heads",
                     "num_key_value_heads", "initial_context_length"):  # fmt: skip
            value = getattr(self, name)
            need(isinstance(value, int) and not isinstance(value, bool) and value > 0,
                 f"{name} must be a positive integer, got {value!r}")  # fmt: skip
        need(
            self.experts_per_token <= self.num_experts,
            f"experts_per_token={self.experts_per_token} > num_experts={self.num_experts}",
        )
        need(
            self.num_attention_heads % self.num_key_value_heads == 0,
            f"num_attention_heads={self.num_attention_heads} is not a multiple of "
            f"num_key_value_heads={self.num_key_value_heads}",
        )
        need(self.head_dim % 2 == 0, f"head_dim={self.head_dim} must be even for RoPE")
        for name in ("hidden_size", "intermediate_size"):
            need(
                getattr(self, name) % 32 == 0,
                f"{name}={getattr(self, name)} must be a multiple of 32 (MXFP4 blocks)",
            )
        need(
            isinstance(self.sliding_window, int) and self.sliding_window >= 0,
            f"sliding_window must be a non-negative integer, got {self.sliding_window!r}",
        )
        need(
            len(self.layer_types) == self.num_hidden_layers,
            f"layer_types has {len(self.layer_types)} entries for "
            f"num_hidden_layers={self.num_hidden_layers}",
        )
        bad = sorted({t for t in self.layer_types if t not in (SLIDING, FULL)})
        need(not bad, f"unknown layer_types {bad}")
        need(
            self.sliding_window > 0 or SLIDING not in self.layer_types,
            "sliding layers need sliding_window > 0",
        )
        need(self.rope_theta > 1, f"rope_theta must be > 1, got {self.rope_theta}")
        need(self.rope_scaling_factor > 0, "rope_scaling_factor must be > 0")
        need(
            0 < self.rope_ntk_alpha < self.rope_ntk_beta,
            f"need 0 < rope_ntk_alpha (beta_slow) < rope_ntk_beta (beta_fast), got "
            f"{self.rope_ntk_alpha}, {self.rope_ntk_beta}",
        )
        need(self.swiglu_limit > 0, "swiglu_limit must be > 0")
        need(self.rms_norm_eps > 0, "rms_norm_eps must be > 0")

    # ---- derived sizes ---------------------------------------------------------------------
    @property
    def q_size(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_key_value_heads * self.head_dim

    @property
    def max_position_embeddings(self) -> int:
        return int(self.initial_context_length * max(self.rope_scaling_factor, 1.0))

    def window(self, layer: int) -> int:
        """Keys a query of this layer may see, itself included; 0 = unlimited."""
        return self.sliding_window if self.layer_types[layer] == SLIDING else 0

    def replace(self, **changes: Any) -> "ModelConfig":
        if "num_hidden_layers" in changes and "layer_types" not in changes:
            changes["layer_types"] = None
        return dataclasses.replace(self, **changes)

    # ---- file formats ----------------------------------------------------------------------
    @classmethod
    def from_original(cls, data: dict[str, Any]) -> "ModelConfig":
        unknown = sorted(set(data) - set(ORIGINAL_KEYS))
        if unknown:
            raise ConfigError(
                f"invalid model config: unknown key(s) {unknown} in original/config.json"
            )
        return cls(**data)

    def to_original(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ORIGINAL_KEYS}

    @classmethod
    def from_hf(cls, data: dict[str, Any]) -> "ModelConfig":
        if data.get("model_type", "gpt_oss") != "gpt_oss":
            raise ConfigError(
                f"invalid model config: model_type {data['model_type']!r} is not gpt_oss"
            )
        rope = data.get("rope_scaling") or data.get("rope_parameters") or {}
        rope_type = rope.get("rope_type", rope.get("type", "yarn"))
        if rope_type != "yarn":
            raise ConfigError(
                f"invalid model config: rope_scaling.rope_type {rope_type!r} is not yarn"
            )
        defaults = cls()
        try:
            return cls(
                num_hidden_layers=data["num_hidden_layers"],
                num_experts=data["num_local_experts"],
                experts_per_token=data.get("num_experts_per_tok", data.get("experts_per_token", 4)),
                vocab_size=data["vocab_size"],
                hidden_size=data["hidden_size"],
                intermediate_size=data["intermediate_size"],
                swiglu_limit=data.get("swiglu_limit", defaults.swiglu_limit),
                head_dim=data["head_dim"],
                num_attention_heads=data["num_attention_heads"],
                num_key_value_heads=data["num_key_value_heads"],
                sliding_window=data.get("sliding_window") or 0,
                initial_context_length=rope.get(
                    "original_max_position_embeddings",
                    data.get("initial_context_length", defaults.initial_context_length)),
                rope_theta=data.get("rope_theta", rope.get("rope_theta", defaults.rope_theta)),
                rope_scaling_factor=rope.get("factor", defaults.rope_scaling_factor),
                rope_ntk_alpha=rope.get("beta_slow", defaults.rope_ntk_alpha),
                rope_ntk_beta=rope.get("beta_fast", defaults.rope_ntk_beta),
                # HF's YaRN defaults truncate to True when the key is absent
                rope_truncate=rope.get("truncate", True),
                rms_norm_eps=data.get("rms_norm_eps", defaults.rms_norm_eps),
                layer_types=data.get("layer_types"),
            )  # fmt: skip
        except KeyError as e:
            raise ConfigError(
                f"invalid model config: config.json lacks key {e.args[0]!r}"
            ) from None

    def _token_or_none(self, token: int) -> int | None:
        # shrunken test vocabularies lack the real <|return|> / <|endoftext|> ids
        return token if token < self.vocab_size else None

    def stop_ids(self, ids: Any = EOS_TOKEN_IDS) -> tuple[int, ...]:
        """eos_token_id as a config file gives it (an id or a list), within this vocabulary."""
        ids = [ids] if isinstance(ids, int) else list(ids or [])
        return tuple(t for t in ids if isinstance(t, int) and 0 <= t < self.vocab_size)

    def generation_config(self) -> dict[str, Any]:
        """generation_config.json as the Hub ships it (spec §1.2), ids within this vocabulary."""
        return {"bos_token_id": self._token_or_none(199998), "do_sample": True,
                "eos_token_id": list(self.stop_ids()),
                "pad_token_id": self._token_or_none(199999)}  # fmt: skip

    def to_hf(self) -> dict[str, Any]:
        """config.json exactly as the Hub ships it (spec §1.2)."""
        return {
            "architectures": ["GptOssForCausalLM"],
            "attention_bias": True,
            "attention_dropout": 0.0,
            "eos_token_id": self._token_or_none(200002),
            "experts_per_token": self.experts_per_token,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "hidden_size": self.hidden_size,
            "initial_context_length": self.initial_context_length,
            "initializer_range": 0.02,
            "intermediate_size": self.intermediate_size,
            "layer_types": list(self.layer_types),
            "max_position_embeddings": self.max_position_embeddings,
            "model_type": "gpt_oss",
            "num_attention_heads": self.num_attention_heads,
            "num_experts_per_tok": self.experts_per_token,
            "num_hidden_layers": self.num_hidden_layers,
            "num_key_value_heads": self.num_key_value_heads,
            "num_local_experts": self.num_experts,
            "output_router_logits": False,
            "pad_token_id": self._token_or_none(199999),
            "quantization_config": {
                "modules_to_not_convert": [
                    "model.layers.*.self_attn",
                    "model.layers.*.mlp.router",
                    "model.embed_tokens",
                    "lm_head",
                ],
                "quant_method": "mxfp4",
            },  # fmt: skip
            "rms_norm_eps": self.rms_norm_eps,
            "rope_scaling": {
                "beta_fast": self.rope_ntk_beta,
                "beta_slow": self.rope_ntk_alpha,
                "factor": self.rope_scaling_factor,
                "original_max_position_embeddings": self.initial_context_length,
                "rope_type": "yarn",
                "truncate": self.rope_truncate,
            },
            "rope_theta": self.rope_theta,
            "router_aux_loss_coef": 0.9,
            "sliding_window": self.sliding_window,
            "swiglu_limit": self.swiglu_limit,
            "tie_word_embeddings": False,
            "transformers_version": "4.55.0.dev0",
            "use_cache": True,
            "vocab_size": self.vocab_size,
        }


PRESETS: dict[str, ModelConfig] = {
    "gpt-oss-120b": ModelConfig(),
    "gpt-oss-20b": ModelConfig(num_hidden_layers=24, num_experts=32),
    # small enough for unit tests, full vocabulary so real text tokenizes
    "tiny": ModelConfig(
        num_hidden_layers=2,
        num_experts=8,
        experts_per_token=2,
        hidden_size=128,
        intermediate_size=128,
        head_dim=32,
        num_attention_heads=8,
        num_key_value_heads=2,
    ),  # fmt: skip
}


def yarn_bounds(cfg: ModelConfig) -> tuple[float, float]:
    """YaRN ramp bounds (low, high) over the rotary pair index (spec §2.4)."""
    half = cfg.head_dim // 2

    def dim_for(rotations: float) -> float:
        ratio = cfg.initial_context_length / (rotations * 2 * math.pi)
        return half * math.log(ratio) / math.log(cfg.rope_theta)

    low, high = dim_for(cfg.rope_ntk_beta), dim_for(cfg.rope_ntk_alpha)
    if cfg.rope_truncate:
        low, high = math.floor(low), math.ceil(high)
    return max(low, 0), min(high, cfg.head_dim - 1)
