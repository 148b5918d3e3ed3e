"""ModelConfig against the spec's numbers (§1.1-§1.3), both config formats, and transformers."""

import json
import math
from typing import Any

import pytest
import transformers

from moerun.errors import ConfigError
from moerun.model.checkpoint import expected_tensors
from moerun.model.config import FULL, PRESETS, SLIDING, ModelConfig

SPEC_20B_LAYER_TYPES = ["sliding_attention", "full_attention"] * 12

# spec §1.2, HF config.json of gpt-oss-20b, typed in from the spec text
SPEC_20B_HF: dict[str, Any] = {
    "architectures": ["GptOssForCausalLM"],
    "attention_bias": True,
    "attention_dropout": 0.0,
    "eos_token_id": 200002,
    "experts_per_token": 4,
    "head_dim": 64,
    "hidden_act": "silu",
    "hidden_size": 2880,
    "initial_context_length": 4096,
    "initializer_range": 0.02,
    "intermediate_size": 2880,
    "layer_types": SPEC_20B_LAYER_TYPES,
    "max_position_embeddings": 131072,
    "model_type": "gpt_oss",
    "num_attention_heads": 64,
    "num_experts_per_tok": 4,
    "num_hidden_layers": 24,
    "num_key_value_heads": 8,
    "num_local_experts": 32,
    "output_router_logits": False,
    "pad_token_id": 199999,
    "quantization_config": {
        "modules_to_not_convert": [
            "model.layers.*.self_attn",
            "model.layers.*.mlp.router",
            "model.embed_tokens",
            "lm_head",
        ],
        "quant_method": "mxfp4",
    },
    "rms_norm_eps": 1e-05,
    "rope_scaling": {
        "beta_fast": 32.0,
        "beta_slow": 1.0,
        "factor": 32.0,
        "original_max_position_embeddings": 4096,
        "rope_type": "yarn",
        "truncate": False,
    },
    "rope_theta": 150000,
    "router_aux_loss_coef": 0.9,
    "sliding_window": 128,
    "swiglu_limit": 7.0,
    "tie_word_embeddings": False,
    "transformers_version": "4.55.0.dev0",
    "use_cache": True,
    "vocab_size": 201088,
}

# spec §1.2, original/config.json of gpt-oss-20b
SPEC_20B_ORIGINAL: dict[str, Any] = {
    "num_hidden_layers": 24, "num_experts": 32, "experts_per_token": 4, "vocab_size": 201088,
    "hidden_size": 2880, "intermediate_size": 2880, "swiglu_limit": 7.0, "head_dim": 64,
    "num_attention_heads": 64, "num_key_value_heads": 8, "sliding_window": 128,
    "initial_context_length": 4096, "rope_theta": 150000, "rope_scaling_factor": 32.0,
    "rope_ntk_alpha": 1, "rope_ntk_beta": 32,
}  # fmt: skip

# every field differs from the defaults, and layer_types is not the alternating rule
CUSTOM = ModelConfig(
    num_hidden_layers=3, num_experts=6, experts_per_token=3, vocab_size=1000, hidden_size=96,
    intermediate_size=160, swiglu_limit=5.5, head_dim=24, num_attention_heads=6,
    num_key_value_heads=3, sliding_window=17, initial_context_length=2048, rope_theta=10000.0,
    rope_scaling_factor=4.0, rope_ntk_alpha=2.0, rope_ntk_beta=16.0, rope_truncate=True,
    rms_norm_eps=1e-6, layer_types=(FULL, SLIDING, FULL),
)  # fmt: skip


def param_count(cfg: ModelConfig) -> int:
    """Parameters: each U8 block byte holds two FP4 weights; scales are not parameters."""
    total = 0
    for spec in expected_tensors(cfg, "hf").values():
        n = math.prod(spec.shape)
        if spec.name.endswith("_blocks"):
            total += 2 * n
        elif not spec.name.endswith("_scales"):
            total += n
    return total


@pytest.mark.parametrize(
    ("name", "params", "nbytes", "n_tensors", "layers"),
    [
        ("gpt-oss-20b", 20_914_757_184, 13_761_264_768, 459, 24),
        ("gpt-oss-120b", 116_829_156_672, 65_248_815_744, 687, 36),
    ],
)
def test_spec_sizes(name: str, params: int, nbytes: int, n_tensors: int, layers: int) -> None:
    cfg = PRESETS[name]
    hf = expected_tensors(cfg, "hf")
    assert param_count(cfg) == params
    assert sum(s.nbytes for s in hf.values()) == nbytes
    assert len(hf) == n_tensors == 19 * layers + 3
    assert len(expected_tensors(cfg, "original")) == 15 * layers + 3
    # both layouts describe the same bytes: q/k/v are row blocks of qkv
    original = expected_tensors(cfg, "original")
    assert sum(s.nbytes for s in original.values()) == nbytes


@pytest.mark.parametrize(
    ("name", "attention", "experts", "active"),
    [
        ("gpt-oss-20b", 637_272_576, 19_116_933_120, 3_608_307_264),
        ("gpt-oss-120b", 955_908_864, 114_701_598_720, 5_132_849_472),
    ],
)
def test_spec_parameter_breakdown(name: str, attention: int, experts: int, active: int) -> None:
    cfg = PRESETS[name]
    hf = expected_tensors(cfg, "hf")

    def count(pred: Any) -> int:
        return sum(
            math.prod(s.shape) * (2 if s.name.endswith("_blocks") else 1)
            for s in hf.values()
            if pred(s.name) and not s.name.endswith("_scales")
        )

    assert count(lambda n: ".self_attn." in n or "input_layernorm" in n) == attention
    assert count(lambda n: ".mlp.experts." in n) == experts
    assert count(lambda n: n == "model.embed_tokens.weight") == 579_133_440
    assert count(lambda n: n == "lm_head.weight") == 579_133_440
    # model-card "active": no embedding table, k of E experts
    k, e = cfg.experts_per_token, cfg.num_experts
    assert param_count(cfg) - 579_133_440 - experts * (e - k) // e == active


def test_presets_match_spec_hyperparameters() -> None:
    for name, layers, experts in (("gpt-oss-20b", 24, 32), ("gpt-oss-120b", 36, 128)):
        c = PRESETS[name]
        assert (c.num_hidden_layers, c.num_experts, c.experts_per_token) == (layers, experts, 4)
        assert (c.hidden_size, c.intermediate_size, c.vocab_size) == (2880, 2880, 201088)
        assert (c.num_attention_heads, c.num_key_value_heads, c.head_dim) == (64, 8, 64)
        assert (c.sliding_window, c.initial_context_length, c.rope_theta) == (128, 4096, 150000)
        assert (c.rope_scaling_factor, c.rope_ntk_alpha, c.rope_ntk_beta) == (32.0, 1.0, 32.0)
        assert (c.swiglu_limit, c.rms_norm_eps, c.rope_truncate) == (7.0, 1e-5, False)
        assert c.q_size + 2 * c.kv_size == 5120
        assert c.max_position_embeddings == 131072
        assert [c.window(i) for i in range(4)] == [128, 0, 128, 0]


def test_to_hf_20b_matches_spec_config_json() -> None:
    got = PRESETS["gpt-oss-20b"].to_hf()
    assert set(got) == set(SPEC_20B_HF)
    for key, value in SPEC_20B_HF.items():
        assert got[key] == value, key
    # written as JSON, it must still be plain JSON equal to the spec
    assert json.loads(json.dumps(got)) == SPEC_20B_HF


def test_to_hf_120b_differs_only_in_layers_and_experts() -> None:
    got = PRESETS["gpt-oss-120b"].to_hf()
    expected = dict(SPEC_20B_HF, num_hidden_layers=36, num_local_experts=128)
    expected["layer_types"] = ["sliding_attention", "full_attention"] * 18
    assert got == expected


def test_layer_types_alternate_starting_with_sliding() -> None:
    for cfg in PRESETS.values():
        n = cfg.num_hidden_layers
        assert list(cfg.layer_types) == [SLIDING if i % 2 == 0 else FULL for i in range(n)]
    odd = ModelConfig(num_hidden_layers=5, num_experts=4)
    assert odd.layer_types == (SLIDING, FULL, SLIDING, FULL, SLIDING)


def test_spec_config_files_parse_to_preset() -> None:
    assert ModelConfig.from_hf(SPEC_20B_HF) == PRESETS["gpt-oss-20b"]
    assert ModelConfig.from_original(SPEC_20B_ORIGINAL) == PRESETS["gpt-oss-20b"]
    assert PRESETS["gpt-oss-20b"].to_original() == SPEC_20B_ORIGINAL


@pytest.mark.parametrize("cfg", [*PRESETS.values(), CUSTOM], ids=[*PRESETS, "custom"])
def test_hf_round_trip(cfg: ModelConfig) -> None:
    # through JSON text, as a real config.json would go
    back = ModelConfig.from_hf(json.loads(json.dumps(cfg.to_hf())))
    assert back == cfg
    assert dataclass_fields(back) == dataclass_fields(cfg)


ORIGINAL_CUSTOM = CUSTOM.replace(rope_truncate=False, rms_norm_eps=1e-5, layer_types=None)


@pytest.mark.parametrize(
    "cfg", [*PRESETS.values(), ORIGINAL_CUSTOM], ids=[*PRESETS, "custom"]
)  # original/config.json has no eps, truncate or layer_types keys
def test_original_round_trip(cfg: ModelConfig) -> None:
    data = json.loads(json.dumps(cfg.to_original()))
    assert set(data) == set(SPEC_20B_ORIGINAL)
    assert ModelConfig.from_original(data) == cfg


def dataclass_fields(cfg: ModelConfig) -> dict[str, Any]:
    """Field values with their types, so 7 vs 7.0 or list vs tuple would show."""
    return {k: (type(v).__name__, v) for k, v in vars(cfg).items()}


def test_from_hf_accepts_transformers5_rope_parameters() -> None:
    data = CUSTOM.to_hf()
    rope = data.pop("rope_scaling")
    del data["rope_theta"]
    data["rope_parameters"] = dict(rope, rope_theta=10000.0)  # theta moved inside
    assert ModelConfig.from_hf(data) == CUSTOM


def test_from_hf_absent_truncate_means_true() -> None:
    # HF's YaRN treats a missing `truncate` as True (spec §1.2 stresses the Hub file says false)
    data = PRESETS["gpt-oss-20b"].to_hf()
    del data["rope_scaling"]["truncate"]
    assert ModelConfig.from_hf(data).rope_truncate is True


def test_from_real_transformers_config() -> None:
    hf = transformers.GptOssConfig(
        num_hidden_layers=3, num_local_experts=6, num_experts_per_tok=3, vocab_size=1000,
        hidden_size=96, intermediate_size=160, head_dim=24, num_attention_heads=6,
        num_key_value_heads=3, sliding_window=17, rms_norm_eps=1e-6, swiglu_limit=5.5,
        rope_parameters={
            "rope_type": "yarn", "factor": 4.0, "beta_fast": 16.0, "beta_slow": 2.0,
            "truncate": True, "original_max_position_embeddings": 2048, "rope_theta": 10000.0,
        },
    )  # fmt: skip
    got = ModelConfig.from_hf(hf.to_dict())
    # transformers derives layer_types itself (even layers slide), so compare with that
    assert list(hf.layer_types) == [SLIDING, FULL, SLIDING]
    assert got == CUSTOM.replace(layer_types=tuple(hf.layer_types))


def test_from_default_transformers_config_is_120b() -> None:
    assert ModelConfig.from_hf(transformers.GptOssConfig().to_dict()) == PRESETS["gpt-oss-120b"]


def test_replace() -> None:
    tiny = PRESETS["tiny"]
    five = tiny.replace(num_hidden_layers=5)
    assert five.layer_types == (SLIDING, FULL, SLIDING, FULL, SLIDING)
    assert five.replace(num_hidden_layers=2) == tiny
    assert tiny.replace(num_experts=16).num_experts == 16
    with pytest.raises(ConfigError, match="experts_per_token"):
        tiny.replace(num_experts=1)


def _hf_without(key: str) -> dict[str, Any]:
    data = PRESETS["gpt-oss-20b"].to_hf()
    del data[key]
    return data


@pytest.mark.parametrize(
    ("make", "names"),
    [
        (lambda: ModelConfig(num_experts=4, experts_per_token=5), ["experts_per_token", "5"]),
        (lambda: ModelConfig(num_attention_heads=12, num_key_value_heads=8),
         ["num_attention_heads", "num_key_value_heads"]),
        (lambda: ModelConfig(hidden_size=2880 + 16), ["hidden_size", "2896"]),
        (lambda: ModelConfig(intermediate_size=100), ["intermediate_size"]),
        (lambda: ModelConfig(head_dim=63), ["head_dim", "63"]),
        (lambda: ModelConfig(num_hidden_layers=3, layer_types=(SLIDING, FULL)), ["layer_types"]),
        (lambda: ModelConfig(num_hidden_layers=2, layer_types=(SLIDING, "linear_attention")),
         ["layer_types", "linear_attention"]),
        (lambda: ModelConfig(num_experts=0), ["num_experts"]),
        (lambda: ModelConfig(hidden_size="2880"), ["hidden_size"]),
        (lambda: ModelConfig.from_hf(_hf_without("hidden_size")), ["hidden_size"]),
        (lambda: ModelConfig.from_hf(_hf_without("num_local_experts")), ["num_local_experts"]),
        (lambda: ModelConfig.from_original(dict(SPEC_20B_ORIGINAL, rms_norm_eps=1e-5)),
         ["rms_norm_eps"]),
        (lambda: ModelConfig.from_hf(dict(SPEC_20B_HF, model_type="llama")),
         ["model_type", "llama"]),
        (lambda: ModelConfig.from_hf(
            dict(SPEC_20B_HF, rope_scaling={"rope_type": "linear", "factor": 32.0})),
         ["rope_type", "linear"]),
        (lambda: ModelConfig.from_hf(
            dict(SPEC_20B_HF, num_experts_per_tok=64, experts_per_token=64)),
         ["experts_per_token", "64"]),
    ],
    ids=[
        "k>E", "heads%kv", "hidden%32", "intermediate%32", "odd-head_dim", "layer_types-length",
        "unknown-layer-type", "zero-experts", "str-hidden", "hf-missing-hidden_size",
        "hf-missing-num_local_experts", "original-unknown-key", "model_type", "rope_type",
        "hf-k>E",
    ],
)  # fmt: skip
def test_rejects_inconsistent_config(make: Any, names: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        make()
    msg = str(info.value)
    assert "\n" not in msg  # the CLI prints it as one line
    for name in names:
        assert name in msg, (name, msg)
