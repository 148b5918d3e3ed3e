"""moerun vs llama.cpp and transformers on this CPU, measured in one run (issue 6, part 4).

    python bench/compare_cpu.py --model /tmp/full20b [--gguf /tmp/full20b.gguf] \\
        [--slice /tmp/slice4] [--prompt-len 512] [--gen-len 32] [--json OUT.json]

Out of CI: needs `gguf`, `llama-cpp-python` and `transformers` (see bench/README.md).

Every engine runs in its own subprocess, one after another (never two big models in memory at
once), so that each one's peak RSS (VmHWM: loading included) is its own:

1. moerun on --model: `moerun.bench.bench` at batch 1 (TTFT of a --prompt-len prompt, then
   --gen-len greedy tokens of a second prompt; decode tok/s from the first token on);
2. llama.cpp (llama-cpp-python) on the same checkpoint converted by bench/to_gguf.py (converted
   first when --gguf does not exist): TTFT of moerun's first prompt (same token ids), then
   --gen-len - 1 greedy single-token steps after it; all threads, flash attention as chosen;
3. on a 4-layer full-width slice (`moerun synth SLICE --preset gpt-oss-20b --layers 4 --layout
   hf`, written when missing): transformers' GptOssForCausalLM in float32 with experts
   dequantized (Mxfp4Config(dequantize=True)), batch-1 greedy decode with its KV cache; and
   moerun on the same slice in float32 and bfloat16.

Prints a table of the numbers and the ratios moerun / baseline. With --multi-turn HISTORY
[--new-tokens 60] it runs the follow-up-turn race of bench/multi_turn.py instead.
"""

import argparse
import inspect
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import multi_turn  # noqa: E402  (bench/multi_turn.py, beside this script)


def _progress(msg: str) -> None:
    print(f"[compare] {msg}", file=sys.stderr, flush=True)


def peak_rss_gib() -> float:
    with open("/proc/self/status") as f:
        kib = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    return kib / 2**20


def _prompt(model: str, length: int, seed: int) -> list[int]:
    """The exact prompt moerun's bench uses (seed 0: the TTFT prompt), without loading weights."""
    from moerun.bench import random_prompts
    from moerun.model.checkpoint import detect_layout, resolve

    _, _, cfg = detect_layout(resolve(model))
    return random_prompts(cfg, 1, length, seed)[0]


# ---- workers: each runs in its own process and prints one JSON line -------------------------
def worker_moerun(
    model: str, prompt_len: int, gen_len: int, dtype: str, dense: str = "bf16"
) -> dict:
    from moerun.bench import bench

    report = bench(model, prompt_len, gen_len, [1], dtype, dense_weights=dense)
    r = report["results"][0]
    return {
        "engine": f"moerun {dtype}, {dense} dense",
        "ttft_s": r["ttft_s"],
        "prefill_tok_s": r["prefill_tok_s"],
        "decode_tok_s": r["decode_tok_s_total"],
        "peak_rss_gib": peak_rss_gib(),
        "read_bandwidth_gbs": report["read_bandwidth_gbs"],
        "bandwidth_limit_tok_s": report["bandwidth_limit_tok_s"],
        "threads": report["threads"],
    }


def worker_llama(
    gguf_path: str, model: str, prompt_len: int, gen_len: int, threads: int, flash_attn: bool
) -> dict:
    import llama_cpp
    import numpy as np
    from llama_cpp import Llama

    t0 = time.perf_counter()
    llm = Llama(
        gguf_path,
        n_ctx=prompt_len + gen_len + 16,
        n_batch=512,
        n_ubatch=512,
        n_threads=threads,
        n_threads_batch=threads,
        flash_attn=flash_attn,
        verbose=False,
    )
    load_s = time.perf_counter() - t0
    n_vocab = llm.n_vocab()

    def next_token() -> int:
        ptr = llama_cpp.llama_get_logits_ith(llm._ctx.ctx, -1)
        return int(np.ctypeslib.as_array(ptr, shape=(n_vocab,)).argmax())

    _progress("llama.cpp: warming up")
    llm.eval(_prompt(model, 8, 2))
    llm.eval([next_token()])
    llm.reset()
    _progress(f"llama.cpp: prompt {prompt_len}, generating {gen_len}")
    prompt = _prompt(model, prompt_len, 0)
    start = time.perf_counter()
    llm.eval(prompt)
    token = next_token()
    ttft = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(gen_len - 1):
        llm.eval([token])
        token = next_token()
    decode_s = time.perf_counter() - start
    return {
        "engine": "llama.cpp",
        "ttft_s": ttft,
        "prefill_tok_s": prompt_len / ttft,
        "decode_tok_s": (gen_len - 1) / decode_s,
        "peak_rss_gib": peak_rss_gib(),
        "load_s": load_s,
        "threads": threads,
        "flash_attn": flash_attn,
        "llama_cpp_python": llama_cpp.__version__,
    }


def worker_transformers(model: str, prompt_len: int, gen_len: int) -> dict:
    import torch
    import transformers
    from transformers import GptOssForCausalLM, Mxfp4Config

    t0 = time.perf_counter()
    hf = GptOssForCausalLM.from_pretrained(
        model, quantization_config=Mxfp4Config(dequantize=True), dtype=torch.float32
    )
    hf.eval()
    load_s = time.perf_counter() - t0

    # the KV cache argument is `cache` in recent transformers, `past_key_values` before
    key = "cache" if "cache" in inspect.signature(hf.forward).parameters else "past_key_values"

    def run(prompt: list[int], n: int) -> tuple[float, float]:
        """(TTFT, decode seconds of the n - 1 tokens after the first); only the last position's
        logits are computed, as moerun and llama.cpp do."""
        start = time.perf_counter()
        out = hf(torch.tensor([prompt]), use_cache=True, logits_to_keep=1)
        token = out.logits[0, -1].argmax().view(1, 1)
        ttft = time.perf_counter() - start
        cache, start = getattr(out, key), time.perf_counter()
        for _ in range(n - 1):
            out = hf(token, use_cache=True, logits_to_keep=1, **{key: cache})
            cache, token = getattr(out, key), out.logits[0, -1].argmax().view(1, 1)
        return ttft, time.perf_counter() - start

    with torch.inference_mode():
        _progress("transformers: warming up")
        run(_prompt(model, 8, 2), 2)
        _progress(f"transformers: prompt {prompt_len}, generating {gen_len}")
        ttft, decode_s = run(_prompt(model, prompt_len, 0), gen_len)
    return {
        "engine": "transformers float32",
        "ttft_s": ttft,
        "prefill_tok_s": prompt_len / ttft,
        "decode_tok_s": (gen_len - 1) / decode_s,
        "peak_rss_gib": peak_rss_gib(),
        "load_s": load_s,
        "threads": torch.get_num_threads(),
        "expert_dtype": str(hf.model.layers[0].mlp.experts.gate_up_proj.dtype),
        "transformers": transformers.__version__,
    }


# ---- driver ---------------------------------------------------------------------------------
def _run_worker(args: list[str]) -> dict:
    """This script as a worker in a fresh process; stderr (progress) passes through."""
    cmd = [sys.executable, str(Path(__file__)), "--worker", *args]
    t0 = time.perf_counter()
    out = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
    if out.returncode != 0:
        raise SystemExit(f"worker {args[0]} failed (exit {out.returncode})")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["wall_s"] = time.perf_counter() - t0
    return result


def _ensure_gguf(model: str, gguf_path: Path) -> None:
    if gguf_path.exists():
        return
    need = sum(p.stat().st_size for p in Path(model).glob("*.safetensors")) * 1.02
    free = shutil.disk_usage(gguf_path.parent).free
    if free < need + 2**30:
        raise SystemExit(
            f"{gguf_path.parent}: {free / 2**30:.1f} GiB free, the GGUF needs "
            f"~{need / 2**30:.1f} GiB"
        )
    _progress(f"converting {model} -> {gguf_path}")
    subprocess.run([sys.executable, str(HERE / "to_gguf.py"), model, str(gguf_path)], check=True)


def _ensure_slice(path: Path) -> None:
    if (path / "config.json").exists():
        return
    _progress(f"writing the 4-layer slice {path}")
    cmd = [sys.executable, "-m", "moerun.cli", "synth", str(path), "--preset", "gpt-oss-20b"]
    subprocess.run([*cmd, "--layers", "4", "--layout", "hf"], check=True)


def _ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}x" if a and b else "-"


def format_table(res: dict, args: argparse.Namespace) -> str:
    lines = []
    mo, ll = res.get("moerun"), res.get("llama.cpp")
    if mo or ll:
        lines += [
            f"full model {args.model}: prompt {args.prompt_len}, gen {args.gen_len}, batch 1",
            f"{'':26}{'moerun':>12}{'llama.cpp':>12}{'moerun/llama':>14}",
        ]
        rows = [
            ("decode tok/s", "decode_tok_s", False),
            ("prefill tok/s", "prefill_tok_s", False),
            ("TTFT s", "ttft_s", True),
            ("peak RSS GiB", "peak_rss_gib", True),
        ]
        for label, key, lower_better in rows:
            a, b = (mo or {}).get(key), (ll or {}).get(key)
            ratio = _ratio(a, b)
            note = " (lower is better)" if lower_better else ""
            fa, fb = (f"{v:>12.3f}" if v is not None else f"{'-':>12}" for v in (a, b))
            lines.append(f"{label:26}{fa}{fb}{ratio:>14}{note}")
        if mo:
            lines.append(
                f"moerun decode = {100 * mo['decode_tok_s'] / mo['bandwidth_limit_tok_s']:.1f}%"
                f" of the memory-bandwidth limit ({mo['bandwidth_limit_tok_s']} tok/s at "
                f"{mo['read_bandwidth_gbs']} GB/s)"
            )
    tr = res.get("transformers")
    sl = {k: v for k, v in res.items() if k.startswith("slice moerun")}
    if tr or sl:
        lines += [
            "",
            f"4-layer slice {args.slice}: prompt {args.slice_prompt_len}, "
            f"gen {args.slice_gen_len}, batch 1",
            f"{'':26}{'decode tok/s':>14}{'prefill tok/s':>15}{'peak RSS GiB':>14}"
            f"{'decode vs transformers':>24}",
        ]
        for name, r in [("transformers float32", tr), *sl.items()]:
            if r:
                lines.append(
                    f"{name:26}{r['decode_tok_s']:>14.3f}{r['prefill_tok_s']:>15.2f}"
                    f"{r['peak_rss_gib']:>14.2f}"
                    f"{_ratio(r['decode_tok_s'], (tr or {}).get('decode_tok_s')):>24}"
                )
    return "\n".join(lines)


def _multi_turn(args: argparse.Namespace, skip: set[str]) -> None:
    h, n = str(args.multi_turn), str(args.new_tokens)
    res = {}
    if "moerun" not in skip:
        _progress("moerun: multi-turn")
        res["moerun bfloat16"] = _run_worker(["moerun-multi", args.model, h, n])
    if "llama" not in skip:
        gguf_path = args.gguf or Path(str(Path(args.model).resolve()) + ".gguf")
        _ensure_gguf(args.model, gguf_path)
        _progress("llama.cpp: multi-turn")
        res["llama.cpp"] = _run_worker(
            ["llama-multi", str(gguf_path), args.model, h, n, str(args.threads)]
        )
    print(multi_turn.table(res, args.multi_turn, args.new_tokens))
    if args.json:
        args.json.write_text(json.dumps({"args": vars(args), "results": res}, default=str) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--worker", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    p.add_argument("--model", help="full checkpoint (HF layout), e.g. a synth gpt-oss-20b")
    p.add_argument("--gguf", type=Path, help="its GGUF (default: MODEL.gguf next to it)")
    p.add_argument(
        "--slice",
        type=Path,
        default=Path("/tmp/moerun-slice4"),
        help="4-layer full-width slice for the transformers baseline",
    )
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--gen-len", type=int, default=32)
    p.add_argument("--slice-prompt-len", type=int, default=64)
    p.add_argument("--slice-gen-len", type=int, default=16)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument(
        "--llama-flash-attn",
        choices=("on", "off"),
        default="on",
        help="llama.cpp's own default (auto) turns it on on the CPU",
    )
    p.add_argument("--dense-weights", choices=("bf16", "int8"), default="bf16",
                   help="moerun's dense weights (int8: race a q8_0 --gguf)")  # fmt: skip
    p.add_argument("--skip", default="", help="comma list of: moerun,llama,transformers,slice")
    p.add_argument(
        "--multi-turn",
        type=int,
        metavar="HISTORY",
        help="instead: the follow-up-turn race (bench/multi_turn.py)",
    )
    p.add_argument("--new-tokens", type=int, default=60, help="with --multi-turn")
    p.add_argument("--json", type=Path, help="also write all numbers here")
    args = p.parse_args()

    if args.worker:
        kind, *rest = args.worker
        fn = {
            "moerun": lambda m, pl, gl, dt, dw="bf16": worker_moerun(m, int(pl), int(gl), dt, dw),
            "llama": lambda g, m, pl, gl, th, fa: worker_llama(
                g, m, int(pl), int(gl), int(th), fa == "on"
            ),
            "transformers": lambda m, pl, gl: worker_transformers(m, int(pl), int(gl)),
            "moerun-multi": lambda m, h, n: multi_turn.worker_moerun(m, int(h), int(n)),
            "llama-multi": lambda g, m, h, n, th: multi_turn.worker_llama(
                g, m, int(h), int(n), int(th)
            ),
        }[kind]
        print(json.dumps(fn(*rest)), flush=True)
        return

    skip = set(filter(None, args.skip.split(",")))
    if args.multi_turn:
        _multi_turn(args, skip)
        return
    res: dict[str, dict] = {}
    t0 = time.perf_counter()
    if args.model and "moerun" not in skip:
        _progress("moerun on the full model")
        res["moerun"] = _run_worker(
            ["moerun", args.model, str(args.prompt_len), str(args.gen_len), "bfloat16",
             args.dense_weights]
        )  # fmt: skip
    if args.model and "llama" not in skip:
        gguf_path = args.gguf or Path(str(Path(args.model).resolve()) + ".gguf")
        _ensure_gguf(args.model, gguf_path)
        _progress(f"llama.cpp on {gguf_path}")
        res["llama.cpp"] = _run_worker(
            [
                "llama",
                str(gguf_path),
                args.model,
                str(args.prompt_len),
                str(args.gen_len),
                str(args.threads),
                args.llama_flash_attn,
            ]
        )
    if "transformers" not in skip or "slice" not in skip:
        _ensure_slice(args.slice)
    sp, sg = str(args.slice_prompt_len), str(args.slice_gen_len)
    if "transformers" not in skip:
        _progress("transformers on the 4-layer slice")
        res["transformers"] = _run_worker(["transformers", str(args.slice), sp, sg])
    if "slice" not in skip:
        for dtype in ("float32", "bfloat16"):
            _progress(f"moerun {dtype} on the 4-layer slice")
            res[f"slice moerun {dtype}"] = _run_worker(["moerun", str(args.slice), sp, sg, dtype])
    print(format_table(res, args))
    print(f"(total {time.perf_counter() - t0:.0f} s)")
    if args.json:
        args.json.write_text(
            json.dumps(
                {"args": {k: str(v) for k, v in vars(args).items()}, "results": res}, indent=2
            )
            + "\n"
        )


if __name__ == "__main__":
    main()
