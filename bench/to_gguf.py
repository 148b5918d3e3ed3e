"""Convert a gpt-oss checkpoint (either layout, as moerun reads it) to a GGUF llama.cpp runs.

    python bench/to_gguf.py CHECKPOINT_DIR OUT.gguf [--dense bf16|f32|q8_0]

Only for the llama.cpp baseline of `bench/compare_cpu.py`; needs `pip install gguf`. What the
file holds (architecture `gpt-oss`, as llama.cpp's `src/models/openai-moe.cpp` loads it):

- experts stay MXFP4, repacked bit for bit into ggml's `block_mxfp4` (17 bytes per 32 values: the
  E8M0 scale byte, then 16 bytes where byte j holds element j in its low nibble and element j+16
  in its high nibble; the checkpoint holds elements 2j (low) and 2j+1 (high)). The 4-bit codes
  keep their meaning: ggml's table is the E2M1 values doubled and its scale is halved;
- mlp1's interleaved rows are split into `ffn_gate_exps` (even rows: the SwiGLU gate) and
  `ffn_up_exps` (odd rows: the linear half), with their biases likewise;
- dense matrices (embedding, q/k/v/o, unembedding) in bf16 (or f32 / q8_0 with `--dense`); norms,
  sinks, every bias and the router in f32, as llama.cpp's own converter writes them;
- the o200k_harmony tokenizer as a byte-level BPE (`gpt2` model, `gpt-4o` pre-tokenizer): ranks are
  ids, and the merges are every split of a token into two tokens, ordered by the merged token's
  rank, which is the order tiktoken merges in.

Tensors are written one at a time, so memory stays near one expert tensor whatever the model size.
llama.cpp reads the YaRN bounds `beta_fast`/`beta_slow` with its defaults (32, 1, gpt-oss's values)
and always rounds them to whole dimensions (HF `truncate: true`); gpt-oss is trained with
`truncate: false`, so llama.cpp's RoPE differs slightly from the reference for 2 of the 32
frequency pairs: a property of llama.cpp, not of this file.
"""

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import gguf
import numpy as np
import torch

from moerun.harmony.tokenizer import SPECIAL_TOKENS, _byte_decoder, load_tokenizer
from moerun.model.checkpoint import load_checkpoint
from moerun.model.config import ModelConfig

QT = gguf.GGMLQuantizationType
ARCH = "gpt-oss"


def mxfp4_to_ggml(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Checkpoint MXFP4 [..., G, 16] blocks + [..., G] scales -> ggml block_mxfp4 bytes [..., G*17].

    Checkpoint byte j of a block: element 2j low nibble, 2j+1 high nibble. ggml byte j: element j
    low nibble, element j+16 high nibble; each block is preceded by its E8M0 scale byte."""
    codes = torch.stack((blocks & 0x0F, blocks >> 4), dim=-1).flatten(-2)  # [..., G, 32] in order
    packed = codes[..., :16] | (codes[..., 16:] << 4)
    return torch.cat((scales.unsqueeze(-1), packed), dim=-1).flatten(-2).contiguous()


def ggml_to_values(raw: torch.Tensor) -> torch.Tensor:
    """Decode ggml block_mxfp4 bytes [..., G*17] to float32 [..., G*32] as ggml's
    dequantize_row_mxfp4 does (doubled E2M1 table, half scale); used by the self-check."""
    kvalues = torch.tensor(
        [0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12], dtype=torch.float32
    )
    b = raw.unflatten(-1, (-1, 17))
    exps = b[..., :1].to(torch.int32) - 127
    half_scale = torch.ldexp(torch.full(exps.shape, 0.5), exps)
    qs = b[..., 1:].long()
    vals = torch.cat((kvalues[qs & 0x0F], kvalues[qs >> 4]), dim=-1) * half_scale
    return vals.flatten(-2)


def _self_check() -> None:
    """Every nibble value at every position decodes to what moerun's dequantizer gives."""
    from moerun.ops.mxfp4 import dequantize

    g = torch.Generator().manual_seed(0)
    blocks = torch.randint(0, 256, (3, 5, 16, 16), dtype=torch.uint8, generator=g)
    blocks[0, 0] = torch.arange(256, dtype=torch.uint8).view(16, 16)  # all 256 bytes
    scales = torch.randint(118, 136, (3, 5, 16), dtype=torch.uint8, generator=g)
    want = dequantize(blocks, scales, torch.float32)
    got = ggml_to_values(mxfp4_to_ggml(blocks, scales))
    if not torch.equal(want.reshape(got.shape), got):
        raise AssertionError("MXFP4 repack does not round-trip")


# ---- tokenizer ------------------------------------------------------------------------------
def _byte_level(b: bytes, table: dict[int, str]) -> str:
    return "".join(table[x] for x in b)


def tokenizer_fields(model_dir: Path, vocab_size: int) -> tuple[list[str], list[int], list[str]]:
    """(tokens, token types, merges) of o200k_harmony, padded/cut to the model's vocab rows."""
    enc = load_tokenizer(model_dir)
    ranks: dict[bytes, int] = enc._mergeable_ranks  # tiktoken: bytes -> rank (= token id)
    table = {b: c for c, b in _byte_decoder().items()}  # byte -> printable char (GPT-2)
    tokens = [f"<|reserved_{i}|>" for i in range(vocab_size)]
    types = [int(gguf.TokenType.CONTROL)] * vocab_size
    for b, i in ranks.items():
        if i < vocab_size:
            tokens[i], types[i] = _byte_level(b, table), int(gguf.TokenType.NORMAL)
    for name, i in {**enc._special_tokens, **SPECIAL_TOKENS}.items():
        if i < vocab_size and i not in ranks.values():
            tokens[i] = name
    merges: list[tuple[int, int, int, str]] = []
    for b, rank in ranks.items():
        for cut in range(1, len(b)):
            left, right = ranks.get(b[:cut]), ranks.get(b[cut:])
            if left is not None and right is not None:
                text = f"{_byte_level(b[:cut], table)} {_byte_level(b[cut:], table)}"
                merges.append((rank, left, right, text))
    merges.sort()
    return tokens, types, [m[3] for m in merges]


# ---- tensors --------------------------------------------------------------------------------
class Item:
    """One GGUF tensor: its numpy shape (outermost first), ggml type, and how to produce bytes."""

    def __init__(self, name: str, shape: tuple[int, ...], qtype: QT, make: Callable) -> None:
        self.name, self.shape, self.qtype, self.make = name, shape, qtype, make

    @property
    def byte_shape(self) -> tuple[int, ...]:
        block, size = gguf.GGML_QUANT_SIZES[self.qtype]
        return (*self.shape[:-1], self.shape[-1] // block * size)

    def data(self) -> np.ndarray:
        t = self.make()
        if self.qtype == QT.Q8_0:  # gguf's own quantizer, as llama.cpp's converter uses
            out = gguf.quants.quantize(t.float().numpy(), QT.Q8_0)
            assert out.shape == self.byte_shape, (self.name, out.shape, self.byte_shape)
            return out
        if self.qtype == QT.F32:
            t = t.float()
        elif self.qtype == QT.BF16:
            t = t.to(torch.bfloat16)
        out = t.contiguous().view(torch.uint8).numpy()
        assert out.shape == self.byte_shape, (self.name, out.shape, self.byte_shape)
        return out


def tensor_items(cfg: ModelConfig, t: dict[str, torch.Tensor], dense: QT) -> list[Item]:
    D, E, I = cfg.hidden_size, cfg.num_experts, cfg.intermediate_size
    q, kv, V = cfg.q_size, cfg.kv_size, cfg.vocab_size
    items = [
        Item("token_embd.weight", (V, D), dense, lambda: t["embedding.weight"]),
        Item("output_norm.weight", (D,), QT.F32, lambda: t["norm.scale"]),
        Item("output.weight", (V, D), dense, lambda: t["unembedding.weight"]),
    ]
    for n in range(cfg.num_hidden_layers):
        b, o = f"block.{n}", f"blk.{n}"

        def qkv(part: str, kind: str, b: str = b) -> Callable[[], torch.Tensor]:
            if f"{b}.attn.q.weight" in t:  # HF layout: separate projections
                return lambda: t[f"{b}.attn.{part}.{kind}"]
            rows = {"q": (0, q), "k": (q, q + kv), "v": (q + kv, q + 2 * kv)}[part]
            return lambda: t[f"{b}.attn.qkv.{kind}"][rows[0] : rows[1]]

        def gate_up(name: str, half: int, b: str = b) -> Callable[[], torch.Tensor]:
            if name == "bias":
                return lambda: t[f"{b}.mlp.mlp1_bias"][:, half::2]
            return lambda: mxfp4_to_ggml(
                t[f"{b}.mlp.mlp1_weight.blocks"][:, half::2],
                t[f"{b}.mlp.mlp1_weight.scales"][:, half::2],
            )

        def down(b: str = b) -> torch.Tensor:
            return mxfp4_to_ggml(t[f"{b}.mlp.mlp2_weight.blocks"], t[f"{b}.mlp.mlp2_weight.scales"])

        def get(name: str) -> Callable[[], torch.Tensor]:
            return lambda: t[name]

        items += [
            Item(f"{o}.attn_norm.weight", (D,), QT.F32, get(f"{b}.attn.norm.scale")),
            Item(f"{o}.attn_q.weight", (q, D), dense, qkv("q", "weight")),
            Item(f"{o}.attn_q.bias", (q,), QT.F32, qkv("q", "bias")),
            Item(f"{o}.attn_k.weight", (kv, D), dense, qkv("k", "weight")),
            Item(f"{o}.attn_k.bias", (kv,), QT.F32, qkv("k", "bias")),
            Item(f"{o}.attn_v.weight", (kv, D), dense, qkv("v", "weight")),
            Item(f"{o}.attn_v.bias", (kv,), QT.F32, qkv("v", "bias")),
            Item(f"{o}.attn_output.weight", (D, q), dense, get(f"{b}.attn.out.weight")),
            Item(f"{o}.attn_output.bias", (D,), QT.F32, get(f"{b}.attn.out.bias")),
            Item(
                f"{o}.attn_sinks.weight", (cfg.num_attention_heads,), QT.F32, get(f"{b}.attn.sinks")
            ),
            Item(f"{o}.post_attention_norm.weight", (D,), QT.F32, get(f"{b}.mlp.norm.scale")),
            Item(f"{o}.ffn_gate_inp.weight", (E, D), QT.F32, get(f"{b}.mlp.gate.weight")),
            Item(f"{o}.ffn_gate_inp.bias", (E,), QT.F32, get(f"{b}.mlp.gate.bias")),
            Item(f"{o}.ffn_gate_exps.weight", (E, I, D), QT.MXFP4, gate_up("weight", 0)),
            Item(f"{o}.ffn_gate_exps.bias", (E, I), QT.F32, gate_up("bias", 0)),
            Item(f"{o}.ffn_up_exps.weight", (E, I, D), QT.MXFP4, gate_up("weight", 1)),
            Item(f"{o}.ffn_up_exps.bias", (E, I), QT.F32, gate_up("bias", 1)),
            Item(f"{o}.ffn_down_exps.weight", (E, D, I), QT.MXFP4, down),
            Item(f"{o}.ffn_down_exps.bias", (E, D), QT.F32, get(f"{b}.mlp.mlp2_bias")),
        ]
    return items


def add_metadata(w: gguf.GGUFWriter, cfg: ModelConfig, name: str) -> None:
    w.add_name(name)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_expert_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_expert_count(cfg.num_experts)
    w.add_expert_used_count(cfg.experts_per_token)
    w.add_sliding_window(cfg.sliding_window)
    # llama.cpp's gpt-oss fixes the layer pattern (even layers slide); refuse anything else
    if any(
        t != ("sliding_attention" if i % 2 == 0 else "full_attention")
        for i, t in enumerate(cfg.layer_types)
    ):
        raise SystemExit("llama.cpp's gpt-oss needs even layers sliding, odd layers full")
    if cfg.swiglu_limit != 7.0:
        raise SystemExit("llama.cpp's gpt-oss hard-codes swiglu_limit 7.0")
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
    w.add_rope_scaling_factor(cfg.rope_scaling_factor)
    w.add_rope_scaling_orig_ctx_len(cfg.initial_context_length)
    w.add_rope_scaling_yarn_beta_fast(cfg.rope_ntk_beta)
    w.add_rope_scaling_yarn_beta_slow(cfg.rope_ntk_alpha)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_MXFP4_MOE)


def add_tokenizer(w: gguf.GGUFWriter, model_dir: Path, cfg: ModelConfig) -> None:
    tokens, types, merges = tokenizer_fields(model_dir, cfg.vocab_size)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-4o")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    for key, token in (("bos", 199998), ("eos", 200002), ("pad", 199999)):
        if token < cfg.vocab_size:
            getattr(w, f"add_{key}_token_id")(token)
    w.add_add_bos_token(False)


def convert(src: str, out: Path, dense: str = "bf16") -> None:
    _self_check()
    t0 = time.perf_counter()
    ckpt = load_checkpoint(src)
    cfg = ckpt.config
    qtype = {"bf16": QT.BF16, "f32": QT.F32, "q8_0": QT.Q8_0}[dense]
    items = tensor_items(cfg, ckpt.tensors, qtype)
    w = gguf.GGUFWriter(out, ARCH)
    add_metadata(w, cfg, Path(src).name)
    add_tokenizer(w, ckpt.directory, cfg)
    for it in items:
        w.add_tensor_info(
            it.name,
            it.byte_shape,
            np.dtype(np.uint8),
            int(np.prod(it.byte_shape)),
            raw_dtype=it.qtype,
        )
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for k, it in enumerate(items):
        w.write_tensor_data(it.data())
        if k % 19 == 2 or k == len(items) - 1:
            print(
                f"[to_gguf] {k + 1}/{len(items)} tensors, {time.perf_counter() - t0:.0f} s",
                file=sys.stderr,
                flush=True,
            )
    w.close()
    print(f"wrote {out} ({out.stat().st_size / 2**30:.2f} GiB) in {time.perf_counter() - t0:.0f} s")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("checkpoint", help="checkpoint folder (HF or original layout)")
    p.add_argument("out", type=Path, help="GGUF file to write")
    p.add_argument(
        "--dense",
        choices=("bf16", "f32", "q8_0"),
        default="bf16",
        help="type of the dense matrices (default bf16, as the checkpoint)",
    )
    args = p.parse_args()
    convert(args.checkpoint, args.out, args.dense)


if __name__ == "__main__":
    main()
