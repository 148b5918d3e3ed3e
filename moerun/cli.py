"""`moerun` command line: synth, score, generate, chat, bench, serve. User errors print one line
and exit 2."""

import argparse
import json
import os
import sys
from pathlib import Path

from moerun.cli_parser import build_parser
from moerun.errors import MoerunError
from moerun.parallel import under_torchrun
from moerun.server import options as serve_options


def _synth(args: argparse.Namespace) -> None:
    from moerun.model.config import PRESETS
    from moerun.model.synth import synth

    changes = {}
    if args.layers is not None:
        changes["num_hidden_layers"] = args.layers
    if args.experts is not None:
        changes["num_experts"] = args.experts
    cfg = PRESETS[args.preset].replace(**changes)
    out = synth(cfg, args.out, layout=args.layout, seed=args.seed)
    print(f"wrote {args.preset} ({cfg.num_hidden_layers} layers, {cfg.num_experts} experts, "
          f"layout {args.layout}) to {out}")  # fmt: skip


def _parse_ints(text: str, option: str = "--tokens") -> list[int]:
    try:
        return [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        raise MoerunError(f"{option} must be comma-separated integers, got {text!r}") from None


def _score(args: argparse.Namespace) -> None:
    import torch

    from moerun.model.checkpoint import load_checkpoint
    from moerun.model.gpt_oss import Transformer
    from moerun.scoring import divergence, score

    if args.tokens is not None:
        tokens = _parse_ints(args.tokens)
    else:
        from moerun.harmony.tokenizer import load_tokenizer

        try:
            text = args.text_file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise MoerunError(f"cannot read {args.text_file}: {e}") from None
        tokens = load_tokenizer().encode_ordinary(text)
    if args.tensor_parallel_size > 1 or under_torchrun():
        return _score_parallel(args, tokens)
    ckpt = load_checkpoint(args.model)
    dtype = getattr(torch, args.dtype)
    # two models: both keep the weights in the mmap, so they share the experts' pages
    shared = bool(args.compare_to)
    model = Transformer.from_checkpoint(ckpt, dtype, args.kernels, args.device, args.dense_weights,
                                        mmap_weights=shared)  # fmt: skip
    if args.compare_to:
        reference = Transformer.from_checkpoint(ckpt, dtype, args.kernels, args.device,
                                                mmap_weights=True)  # fmt: skip
        div = divergence(model, reference, tokens)
        if args.json:
            print(json.dumps(div._asdict()))
        else:
            print(f"{args.dense_weights} vs {args.compare_to} dense weights over {div.positions} "
                  f"positions: KL mean {div.mean_kl:.6f} max {div.max_kl:.6f} p99 "
                  f"{div.p99_kl:.6f} nats; mean |dlogprob| {div.mean_abs_dlogprob:.6f}; "
                  f"same top-1 {100 * div.same_top1:.2f}%")  # fmt: skip
        return
    _print_score(score(model, tokens)._asdict(), args.json)


def _score_parallel(args: argparse.Namespace, tokens: list[int]) -> None:
    from moerun.parallel.launch import join_torchrun, leave_torchrun, run_ranks
    from moerun.parallel.tasks import score_rank

    if args.compare_to or args.dense_weights != "bf16":
        raise MoerunError("--tensor-parallel-size runs bf16 dense weights only (no --compare-to)")
    task = (args.model, tokens, args.dtype, args.kernels, args.device, args.expert_parallel)
    if under_torchrun():  # this process is one rank of the job; rank 0 prints
        rank, size = join_torchrun(args.device)
        result = score_rank(rank, size, *task)
        leave_torchrun()
        if rank != 0:
            return
    else:
        result = run_ranks(args.tensor_parallel_size, score_rank, *task, device=args.device)
    _print_score(result, args.json)


def _print_score(result: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(result))
    else:
        scored = len(result["tokens"]) - 1
        mean = -sum(lp for lp in result["logprobs"][1:]) / scored
        print(f"tokens: {len(result['tokens'])}  scored: {scored}  "
              f"mean NLL: {mean:.4f}  perplexity: {result['perplexity']:.4f}")  # fmt: skip


def _generate(args: argparse.Namespace) -> None:
    from moerun import LLM, SamplingParams

    params = SamplingParams(temperature=args.temperature, top_p=args.top_p,
                            max_tokens=args.max_tokens, seed=args.seed)  # fmt: skip
    llm = LLM(args.model, args.device, dtype=args.dtype, max_model_len=args.max_model_len,
              dense_weights=args.dense_weights, mmap_weights=args.mmap_weights,
              **_parallel_options(args))  # fmt: skip
    finish = None
    for delta in llm.stream(args.prompt, params):
        sys.stdout.write(delta.text)
        sys.stdout.flush()
        finish = delta.finish_reason
    sys.stdout.write("\n")
    print(f"[finish_reason: {finish}]", file=sys.stderr)


def _parallel_options(args: argparse.Namespace) -> dict:
    if args.tensor_parallel_size < 1:
        raise MoerunError(f"--tensor-parallel-size must be >= 1, got {args.tensor_parallel_size}")
    return {"tensor_parallel_size": args.tensor_parallel_size,
            "expert_parallel": args.expert_parallel}  # fmt: skip


def _chat(args: argparse.Namespace) -> None:
    from moerun import LLM, SamplingParams
    from moerun.chat_repl import ChatSession, load_tools, read_line, run_chat

    tools = load_tools(args.tools) if args.tools else []
    params = SamplingParams.from_request(max_tokens=args.max_tokens, temperature=args.temperature)
    llm = LLM(args.model, args.device, dtype=args.dtype, max_model_len=args.max_model_len,
              dense_weights=args.dense_weights, mmap_weights=args.mmap_weights,
              **_parallel_options(args))  # fmt: skip
    session = ChatSession(llm, args.reasoning_effort, args.system, tools, args.show_reasoning,
                          params, color=sys.stdout.isatty())  # fmt: skip
    run_chat(session, read_line, sys.stdout)


def _bench(args: argparse.Namespace) -> None:
    from moerun.bench import bench, format_multi_turn, format_table, multi_turn

    if args.multi_turn is not None:
        if args.multi_turn < 1 or args.new_tokens < 1:
            raise MoerunError("need --multi-turn >= 1 and --new-tokens >= 1")
        report = multi_turn(args.model, args.multi_turn, args.new_tokens, args.dtype, args.device,
                            args.dense_weights, args.mmap_weights)  # fmt: skip
        print(json.dumps(report) if args.json else format_multi_turn(report))
        return

    batches = _parse_ints(args.batch, "--batch")
    if not batches or min(batches) < 1 or args.prompt_len < 1 or args.gen_len < 2:
        raise MoerunError("need --batch >= 1, --prompt-len >= 1 and --gen-len >= 2")
    report = bench(args.model, args.prompt_len, args.gen_len, batches, args.dtype, args.device,
                   args.dense_weights, args.mmap_weights, **_parallel_options(args))  # fmt: skip
    print(json.dumps(report) if args.json else format_table(report))


def served_name(model: str) -> str:
    """The model folder's name (the one above an `original/` folder); a Hugging Face id names
    itself."""
    if model.count("/") == 1 and not model.startswith((".", "/")) and not Path(model).exists():
        return model  # the rule moerun.model.checkpoint.resolve goes to the Hub by
    path = Path(os.path.abspath(model))  # "." and "..": real names, symlinks kept as given
    return path.parent.name if path.name == "original" else path.name


def _serve(args: argparse.Namespace) -> None:
    from moerun.config import EngineConfig
    from moerun.llm import make_engine
    from moerun.server.app import create_app
    from moerun.server.bounded_store import BoundedStore
    from moerun.server.engine_client import AsyncEngine
    from moerun.server.listen import bind_socket
    from moerun.server.shutdown import build_server
    from moerun.server.state import ServerState

    serve_options.check(args)
    if args.max_reasoning_tokens is not None and args.max_reasoning_tokens < 0:
        raise MoerunError("--max-reasoning-tokens must be >= 0")
    cfg = EngineConfig(
        args.model, args.device, args.dtype, args.max_model_len, args.kv_cache_memory,
        max_num_seqs=args.max_num_seqs, kernels=args.kernels, enforce_eager=args.enforce_eager,
        enable_prefix_caching=args.enable_prefix_caching, dense_weights=args.dense_weights,
        mmap_weights=args.mmap_weights, **_parallel_options(args),
    )  # fmt: skip
    rank0 = _torchrun_rank0(cfg)  # torchrun: ranks 1.. serve rank 0's steps, then return None
    if rank0 is False:
        return
    sock = bind_socket(args.host, args.port)  # before the model loads: a taken port fails now
    engine = AsyncEngine(rank0 or make_engine(cfg))
    name = args.served_model_name or served_name(args.model)
    state = ServerState(engine, name, args.api_key, args.default_reasoning_effort,
                        max_reasoning_tokens=args.max_reasoning_tokens,
                        stored_responses=BoundedStore(args.response_store_bytes),
                        max_request_bytes=args.max_request_bytes,
                        metrics_no_auth=args.metrics_no_auth)  # fmt: skip
    port = sock.getsockname()[1]  # the real one when --port 0
    server = build_server(create_app(state), state, args.host, port, args.shutdown_timeout)
    print(f"moerun: serving {name} on http://{args.host}:{port}/v1", file=sys.stderr, flush=True)
    if warning := serve_options.exposure_warning(args.host, args.api_key):
        print(warning, file=sys.stderr, flush=True)
    server.run(sockets=[sock])  # listens on the socket bound above; SIGTERM drains (shutdown.py)


def _torchrun_rank0(cfg):
    """Under torchrun: rank 0's ParallelEngine; on the other ranks, serve its steps until it
    stops, then False. Without torchrun: None."""
    if not under_torchrun():
        return None
    from moerun.parallel.engine import ParallelEngine, worker_loop
    from moerun.parallel.launch import join_torchrun, leave_torchrun

    rank, size = join_torchrun(cfg.device)
    if rank != 0:
        worker_loop(rank, size, cfg)
        leave_torchrun()  # rank 0's ParallelEngine.close meets it
        return False
    return ParallelEngine(cfg, 0, size)


def _require_cuda() -> None:
    import torch

    if not torch.cuda.is_available():
        built = "this torch has no CUDA" if torch.version.cuda is None else "no GPU is visible"
        raise MoerunError(f"--device cuda: CUDA is not available ({built}); use --device cpu")


def _resolve_demo(args: argparse.Namespace) -> None:
    """`--model demo` (the default): the packaged demo model, served under the name "demo"."""
    from moerun.demo.weights import resolve_model

    model = getattr(args, "model", None)
    folder = model and resolve_model(model)  # hashes and maybe expands the package: once
    if folder == model:
        return
    args.model = folder
    if getattr(args, "served_model_name", "") is None:
        args.served_model_name = model


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    commands = {"synth": _synth, "score": _score, "generate": _generate, "chat": _chat,
                "bench": _bench, "serve": _serve}  # fmt: skip
    try:
        if getattr(args, "device", None) == "cuda":
            _require_cuda()
        _resolve_demo(args)
        commands[args.command](args)
    except (MoerunError, ValueError, OSError) as e:  # bad input, bad files, disk full
        print(f"moerun {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
