"""Check bench/to_gguf.py: llama.cpp on the converted GGUF gives moerun's log-probabilities.

    python bench/check_gguf.py --self-test            # synthesizes small models, converts, checks
    python bench/check_gguf.py CHECKPOINT FILE.gguf   # one pair: how far apart, in plain precision

Each check runs moerun in float32 with the reference torch ops and llama.cpp (llama-cpp-python,
logits of every position) on one random token sequence, and compares the log-probabilities over
the whole vocabulary at every position.

Plain precision: llama.cpp rounds activations to bf16 for bf16 weights, quantizes them to q8_0
for the MXFP4 matmuls and keeps K/V in f16, so differences of ~0.1-0.5 (max over 201088 entries)
are normal, about what moerun's own bfloat16 mode shows; a router near-tie that picks a
different expert gives an isolated larger one. It also rounds the YaRN bounds (see to_gguf.py).

`--emulate-ggml` (and the self-test) removes all of that to test the layout exactly: an f32-dense
GGUF, an f32 K/V cache in llama.cpp, moerun's expert inputs rounded to q8_0 as ggml does, and a
checkpoint with `rope_truncate=True` (the YaRN llama.cpp implements). Then the two agree to
float32 rounding (~1e-5), and any mistake in nibble order, gate/up split, biases, sinks, RoPE or
the sliding window would show as O(0.1-10).
"""

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
GGML_TYPE_F32 = 0


def _q8_0(x: torch.Tensor) -> torch.Tensor:
    """ggml's quantize_row_q8_0 (its AVX2 form) then dequantize: blocks of 32, codes
    round-half-even(x * 127/amax), scale amax/127 stored as fp16."""
    xb = x.float().unflatten(-1, (-1, 32))
    amax = xb.abs().amax(-1, keepdim=True)
    q = torch.round(xb * torch.where(amax > 0, 127 / amax, torch.zeros_like(amax)))
    return (q * (amax / 127).half().float()).flatten(-2).to(x.dtype)


def _emulate_ggml_expert_inputs() -> None:
    """Make moerun's reference expert MLP see its inputs as llama.cpp's MXFP4 matmul does."""
    import moerun.ops.moe as moe
    from moerun.ops.mxfp4 import dequantize

    def expert_mlp(x, w, e, limit):  # same as moe._expert_mlp, inputs through q8_0
        w1 = dequantize(w.mlp1_blocks[e], w.mlp1_scales[e], x.dtype)
        a = moe.swiglu(_q8_0(x) @ w1.T + w.mlp1_bias[e], limit)
        w2 = dequantize(w.mlp2_blocks[e], w.mlp2_scales[e], x.dtype)
        return _q8_0(a) @ w2.T + w.mlp2_bias[e]

    moe._expert_mlp = expert_mlp


def moerun_logprobs(checkpoint: str, ids: list[int], round_yarn: bool = False) -> np.ndarray:
    from moerun.model.checkpoint import load_checkpoint
    from moerun.model.gpt_oss import Transformer

    ckpt = load_checkpoint(checkpoint)
    if round_yarn:  # llama.cpp floors/ceils the YaRN ramp bounds (HF `truncate: true`)
        ckpt.config = ckpt.config.replace(rope_truncate=True)
    model = Transformer.from_checkpoint(ckpt, torch.float32, "torch")
    with torch.inference_mode():
        return model(torch.tensor(ids)).float().log_softmax(-1).numpy()


def llama_logprobs(gguf_path: str, ids: list[int], threads: int, f32_kv: bool):
    from llama_cpp import Llama

    kv = {"type_k": GGML_TYPE_F32, "type_v": GGML_TYPE_F32} if f32_kv else {}
    llm = Llama(
        gguf_path,
        n_ctx=len(ids) + 8,
        n_batch=512,
        logits_all=True,
        n_threads=threads,
        n_threads_batch=threads,
        verbose=False,
        **kv,
    )
    llm.eval(ids)
    logits = torch.from_numpy(np.array(llm.scores[: len(ids)], dtype=np.float32))
    return logits.log_softmax(-1).numpy(), llm


TEXTS = [
    "hello world",
    "2 + 2 = 4.",
    "The quick brown fox jumps over the lazy dog's back!",
    "  indented\n\tcode = {'a': 1}  # comment\r\n",
    "Ünïcödé — 東京 ١٢٣ 12345 🙂 can't",
]


def tokenizer_mismatches(llm, checkpoint: str) -> list[str]:
    from moerun.harmony.tokenizer import load_tokenizer

    enc = load_tokenizer(checkpoint)
    bad = []
    for text in TEXTS:
        want = enc.encode_ordinary(text)
        got = llm.tokenize(text.encode(), add_bos=False, special=False)
        if got != want:
            bad.append(f"{text[:40]!r}: llama.cpp {got[:12]} vs moerun {want[:12]}")
    return bad


def compare(
    checkpoint: str, gguf_path: str, n_tokens: int, seed: int, threads: int, emulate: bool
) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 199998, (n_tokens,), generator=g).tolist()
    if emulate:
        _emulate_ggml_expert_inputs()
    ours = moerun_logprobs(checkpoint, ids, round_yarn=emulate)
    theirs, llm = llama_logprobs(gguf_path, ids, threads, f32_kv=emulate)
    per_pos = np.abs(ours - theirs).max(-1)
    nxt = np.arange(len(ids) - 1)
    nxt_diff = np.abs(ours[nxt, ids[1:]] - theirs[nxt, ids[1:]])
    return {
        "checkpoint": checkpoint,
        "gguf": gguf_path,
        "tokens": n_tokens,
        "emulate_ggml": emulate,
        "max_abs_dlogprob": float(per_pos.max()),
        "per_position_max_abs_dlogprob": [float(d) for d in per_pos],
        "median_over_positions_of_max_abs_dlogprob": float(np.median(per_pos)),
        "mean_abs_dlogprob": float(np.abs(ours - theirs).mean()),
        "max_abs_dlogprob_of_next_token": float(nxt_diff.max()),
        "argmax_agreement": float((ours.argmax(-1) == theirs.argmax(-1)).mean()),
        "tokenizer_mismatches": tokenizer_mismatches(llm, checkpoint),
    }


def _run_compare_subprocess(ckpt: Path, gguf_path: Path, n: int, emulate: bool) -> dict:
    """One comparison per process: --emulate-ggml patches moerun's expert MLP in place."""
    cmd = [
        sys.executable,
        str(Path(__file__)),
        str(ckpt),
        str(gguf_path),
        "--tokens",
        str(n),
        "--json",
        "--tolerance",
        "inf",
    ] + (["--emulate-ggml"] if emulate else [])
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def self_test(workdir: Path) -> bool:
    """Small random models (full vocabulary) through to_gguf.py and llama.cpp.

    Exact cases pass when position 0 and the median position agree within 1e-4. Not every
    position can: a q8_0 code sits on a rounding boundary now and then, so a ~1e-6 difference in
    an expert's input moves it by one step (moerun in float32 vs float64 shows the same isolated
    jumps), and in a 2-layer model the full-attention layer carries such a jump to later
    positions. A layout mistake moves every position by O(0.1-10)."""
    from moerun.model.config import PRESETS
    from moerun.model.synth import synth

    tiny = PRESETS["tiny"].replace(sliding_window=16)  # 8 experts, 2 used; window crossed
    width = PRESETS["gpt-oss-20b"].replace(num_hidden_layers=1, sliding_window=16)
    cases = [  # name, config, layout, dense type, emulate, tokens
        ("tiny-hf-exact", tiny, "hf", "f32", True, 64),
        ("tiny-original-exact", tiny, "original", "f32", True, 64),
        ("20b-1-layer-hf-exact", width, "hf", "f32", True, 48),
        ("tiny-hf-plain", PRESETS["tiny"], "hf", "bf16", False, 200),
    ]
    ok = True
    for name, cfg, layout, dense, emulate, n in cases:
        ckpt, out = workdir / name, workdir / f"{name}.gguf"
        synth(cfg, ckpt, layout=layout, seed=1)
        subprocess.run(
            [sys.executable, str(HERE / "to_gguf.py"), str(ckpt), str(out), "--dense", dense],
            check=True,
            capture_output=True,
        )
        r = _run_compare_subprocess(ckpt, out, n, emulate)
        per_pos = r["per_position_max_abs_dlogprob"]
        if emulate:
            passed = per_pos[0] <= 1e-4 and float(np.median(per_pos)) <= 1e-4
        else:
            passed = float(np.median(per_pos)) <= 1.0
        passed &= not r["tokenizer_mismatches"]
        ok &= passed
        exact = sum(d <= 1e-4 for d in per_pos)
        print(
            f"{name:22} {'PASS' if passed else 'FAIL'}  max|Δlogprob| over vocab: "
            f"median position {np.median(per_pos):.1e}, worst {max(per_pos):.1e}; "
            f"positions within 1e-4: {exact}/{n}; mean {r['mean_abs_dlogprob']:.1e}; "
            f"argmax agree {r['argmax_agreement']:.3f}; tokenizer "
            f"{'same' if not r['tokenizer_mismatches'] else r['tokenizer_mismatches']}",
            flush=True,
        )
        for p in ckpt.iterdir():
            p.unlink()
        ckpt.rmdir()
        out.unlink()
    return ok


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("checkpoint", nargs="?")
    p.add_argument("gguf", nargs="?")
    p.add_argument("--self-test", action="store_true")
    p.add_argument("--tokens", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--emulate-ggml",
        action="store_true",
        help="q8_0 expert inputs in moerun, f32 K/V in llama.cpp (see above)",
    )
    p.add_argument(
        "--tolerance",
        type=float,
        default=None,
        help="fail when the median position's max |Δ logprob| exceeds this "
        "(default 1e-4 with --emulate-ggml, else 1.0)",
    )
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    if args.self_test:
        with tempfile.TemporaryDirectory(dir="/tmp") as d:
            sys.exit(0 if self_test(Path(d)) else 1)
    if not (args.checkpoint and args.gguf):
        p.error("give CHECKPOINT and FILE.gguf, or --self-test")
    r = compare(args.checkpoint, args.gguf, args.tokens, args.seed, args.threads, args.emulate_ggml)
    print(json.dumps(r) if args.json else "\n".join(f"{k}: {v}" for k, v in r.items()))
    tol = args.tolerance if args.tolerance is not None else (1e-4 if args.emulate_ggml else 1.0)
    bad = r["median_over_positions_of_max_abs_dlogprob"] > tol
    sys.exit(1 if bad or r["tokenizer_mismatches"] else 0)


if __name__ == "__main__":
    main()
