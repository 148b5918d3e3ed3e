"""The `moerun` command line's arguments: one sub-parser per command, each option's default shown
in --help. The commands themselves live in moerun/cli.py."""

import argparse
from pathlib import Path

from moerun.ops.backend import KERNELS
from moerun.server import options as serve_options

DTYPES = ("bfloat16", "float32")
KERNELS_HELP = ("cpu: the C kernels; triton: the CUDA kernels; torch: the reference ops "
                "(bit-exact bf16); auto: cpu on a CPU if built, triton on CUDA")  # fmt: skip
DEVICES = ("cpu", "cuda")
MODEL_HELP = ("checkpoint folder, Hugging Face id, or demo: the tiny trained gpt-oss that "
              "ships with moerun")  # fmt: skip
MAX_LEN_HELP = "prompt + generated tokens of one request; at most the model's context length"
DENSE_HELP = ("int8: attention projections and unembedding quantized to 8 bits at load "
              "(CPU; ~30%% fewer bytes per decoded token)")  # fmt: skip


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """Each option's default in --help, except an unset or off one (nothing to read there)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default in (None, False):
            return action.help
        return super()._get_help_string(action)


def _dtype_device(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dtype", choices=DTYPES, default="bfloat16", help="compute dtype")
    p.add_argument("--device", choices=DEVICES, default="cpu", help="where the model runs")


def _dense(p: argparse.ArgumentParser, mmap: bool = True) -> None:
    p.add_argument("--dense-weights", choices=("bf16", "int8"), default="bf16", help=DENSE_HELP)
    if mmap:
        p.add_argument(
            "--mmap-weights",
            action="store_true",
            help="CPU: keep the weights in the mmap'd checkpoint (lazy, page cache shared "
            "between processes) instead of copying them into memory at load (faster decode)",
        )


def _parallel(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tensor-parallel-size", type=int, default=1,
                   help="ranks the model is split over (torch.distributed: gloo on a CPU, NCCL on "
                   "CUDA); spawned on this machine, or the torchrun job's ranks")  # fmt: skip
    p.add_argument("--expert-parallel", action="store_true",
                   help="split the experts whole over the ranks (E/N each) instead of each "
                   "expert's width")  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="moerun", description="Run gpt-oss models.")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("synth", help="write a random-weight checkpoint in the real layout")
    s.add_argument("out", type=Path, help="folder to write")
    s.add_argument("--preset", choices=("tiny", "gpt-oss-20b", "gpt-oss-120b"), default="tiny",
                   help="model shape")  # fmt: skip
    s.add_argument("--layers", type=int, help="override num_hidden_layers")
    s.add_argument("--experts", type=int, help="override num_experts")
    s.add_argument("--layout", choices=("hf", "original", "both"), default="both",
                   help="Hugging Face files, original/, or both")  # fmt: skip
    s.add_argument("--seed", type=int, default=0, help="random weights seed")

    c = sub.add_parser("score", help="per-token log-probabilities and perplexity")
    c.add_argument("--model", default="demo", help=MODEL_HELP)
    src = c.add_mutually_exclusive_group(required=True)
    src.add_argument("--text-file", type=Path, help="UTF-8 text, tokenized as plain text")
    src.add_argument("--tokens", help="comma-separated token ids, e.g. 1,2,3")
    _dtype_device(c)
    c.add_argument("--json", action="store_true", help="print one JSON object")
    c.add_argument("--kernels", choices=KERNELS, default="auto", help=KERNELS_HELP)
    _dense(c, mmap=False)
    _parallel(c)
    c.add_argument(
        "--compare-to",
        choices=("bf16",),
        help="also score with bf16 dense weights and report the KL divergence to them",
    )

    g = sub.add_parser("generate", help="stream a raw completion of a text prompt (no chat format)")
    g.add_argument("--model", default="demo", help=MODEL_HELP)
    g.add_argument("--prompt", required=True, help="text to continue")
    g.add_argument("--max-tokens", type=int, default=64, help="tokens to generate at most")
    g.add_argument("--temperature", type=float, default=1.0, help="0: greedy")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling")
    g.add_argument("--seed", type=int, help="sampling seed")
    _dtype_device(g)
    g.add_argument("--max-model-len", type=int, default=8192, help=MAX_LEN_HELP)
    _dense(g)
    _parallel(g)

    t = sub.add_parser("chat", help="interactive chat in the harmony format")
    t.add_argument("--model", default="demo", help=MODEL_HELP)
    t.add_argument("--reasoning-effort", choices=("low", "medium", "high"), default="medium",
                   help="shown to the model in the system message")  # fmt: skip
    t.add_argument("--system", help="instructions for the model (a developer message)")
    t.add_argument("--show-reasoning", action="store_true", help="print reasoning, dimmed")
    t.add_argument("--max-tokens", type=int, default=2048, help="tokens per answer at most")
    t.add_argument("--temperature", type=float, default=1.0, help="0: greedy")
    t.add_argument("--tools", help="JSON file with a list of function tools")
    _dtype_device(t)
    t.add_argument("--max-model-len", type=int, default=8192, help=MAX_LEN_HELP)
    _dense(t)
    _parallel(t)

    _add_bench(sub)
    _add_serve(sub)
    for command in sub.choices.values():
        command.formatter_class = _Help
    return p


def _add_bench(sub: argparse._SubParsersAction) -> None:
    b = sub.add_parser("bench", help="prefill/decode speed, memory, bandwidth roofline")
    b.add_argument("--model", default="demo", help=MODEL_HELP)
    b.add_argument("--prompt-len", type=int, default=512, help="prompt tokens per request")
    b.add_argument("--gen-len", type=int, default=128, help="generated tokens per request")
    b.add_argument("--batch", default="1,4,16", help="comma-separated batch sizes")
    _dtype_device(b)
    _dense(b)
    _parallel(b)
    b.add_argument("--json", action="store_true", help="print one JSON object")
    b.add_argument(
        "--multi-turn",
        type=int,
        metavar="HISTORY",
        help="instead: TTFT of a follow-up turn resending HISTORY tokens (cache)",
    )
    b.add_argument("--new-tokens", type=int, default=60, help="with --multi-turn")


def _add_serve(sub: argparse._SubParsersAction) -> None:
    v = sub.add_parser("serve", help="OpenAI-compatible HTTP server")
    v.add_argument("--model", default="demo", help=MODEL_HELP)
    v.add_argument("--host", default="127.0.0.1", help="address to listen on")
    v.add_argument("--port", type=int, default=8000, help="TCP port (0: any free one)")
    v.add_argument("--api-key", help="require `Authorization: Bearer KEY`")
    v.add_argument("--served-model-name", help="model name clients use (default: from --model)")
    _dtype_device(v)
    v.add_argument("--max-model-len", type=int, default=8192, help=MAX_LEN_HELP)
    v.add_argument(
        "--kv-cache-memory",
        default="auto",
        help="bytes for K/V (e.g. 20GiB); auto: 2GiB on a CPU, 90%% of free GPU memory",
    )
    v.add_argument("--max-num-seqs", type=int, default=64, help="requests running at once")
    v.add_argument("--kernels", choices=KERNELS, default="auto", help=KERNELS_HELP)
    v.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs")
    _dense(v)
    _parallel(v)
    v.add_argument(
        "--enable-prefix-caching",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="reuse cached K/V of earlier prompts",
    )
    v.add_argument("--default-reasoning-effort", choices=("low", "medium", "high"),
                   default="medium", help="for requests that set none")  # fmt: skip
    v.add_argument(
        "--max-reasoning-tokens",
        type=int,
        help="default reasoning budget: after that many analysis tokens the answer is forced "
        "to begin (a request's max_reasoning_tokens overrides it; default: none)",
    )
    serve_options.add_flags(v)  # limits, shutdown, /metrics access
