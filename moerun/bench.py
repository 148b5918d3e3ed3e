"""`moerun bench`: time to first token, prefill and decode speed, peak memory, and how close
decode comes to this machine's memory-bandwidth limit (bytes a decode step must read ÷ the read
bandwidth the bench measures itself)."""

import statistics
import sys
import time
from typing import NamedTuple

import torch

from moerun import LLM, SamplingParams
from moerun.model.config import ModelConfig


class BenchResult(NamedTuple):
    batch: int
    ttft_s: float  # one request of prompt_len tokens, alone
    prefill_tok_s: float
    decode_tok_s_per_stream: float
    decode_tok_s_total: float


def peak_rss_gib() -> float:
    with open("/proc/self/status") as f:
        kib = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    return kib / 2**20


def read_bandwidth_report(size_mib: int = 1024, repeats: int = 7, device: str = "cpu") -> dict:
    """Full reads of a buffer much larger than the caches with the threads the engine uses
    (torch's count): the median in GB/s, every repetition, and how it was measured. On CUDA
    a device-to-device copy, counting the bytes read and written (what a GPU's bandwidth
    figure means)."""
    cuda = torch.device(device).type == "cuda"
    buf = torch.ones(size_mib * 2**20 // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(buf) if cuda else None
    buf.sum()  # first touch
    reps = []
    for _ in range(repeats):
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        if cuda:
            dst.copy_(buf)
            torch.cuda.synchronize()
        else:
            buf.sum()
        reps.append(buf.numel() * 4 * (2 if cuda else 1) / (time.perf_counter() - start) / 1e9)
    how = "copy_ (read + write)" if cuda else f"sum, {torch.get_num_threads()} threads"
    return {
        "gbs": statistics.median(reps),
        "reps_gbs": [round(r, 2) for r in reps],
        "method": f"torch {how}, {size_mib} MiB fp32, median of {repeats}",
    }


def read_bandwidth_gbs(size_mib: int = 1024, repeats: int = 7, device: str = "cpu") -> float:
    """The median of read_bandwidth_report."""
    return read_bandwidth_report(size_mib, repeats, device)["gbs"]


def _expert_bytes(cfg: ModelConfig, dtype_bytes: int = 2) -> int:
    """One expert: MXFP4 mlp1 [2I, D] and mlp2 [D, I] (blocks + scales), and its biases."""
    D, I = cfg.hidden_size, cfg.intermediate_size
    mxfp4 = lambda rows, cols: rows * cols // 2 + rows * cols // 32  # noqa: E731
    return mxfp4(2 * I, D) + mxfp4(D, I) + (2 * I + D) * dtype_bytes


def decode_bytes_per_token(cfg: ModelConfig, dtype_bytes: int = 2, dense: str = "bf16") -> int:
    """Weights one batch-1 decode step reads: every dense weight, k of E experts, the norms, one
    embedding row, the whole unembedding. dense "int8": the attention projections and the
    unembedding take 1 byte a weight plus 8 per row (scale, row sum)."""
    D, k = cfg.hidden_size, cfg.experts_per_token
    # a matrix [N, K]: its weights and its per-row extras
    mat = (lambda N, K: N * K + 8 * N) if dense == "int8" else (lambda N, K: N * K * dtype_bytes)
    qkv, out = mat(cfg.q_size + 2 * cfg.kv_size, D), mat(D, cfg.q_size)
    # biases of qkv and out, the attention norm, the sinks
    vectors = (cfg.q_size + 2 * cfg.kv_size + 2 * D + cfg.num_attention_heads) * dtype_bytes
    router = (cfg.num_experts * (D + 1) + D) * dtype_bytes
    per_layer = qkv + out + vectors + router + k * _expert_bytes(cfg, dtype_bytes)
    return (cfg.num_hidden_layers * per_layer + mat(cfg.vocab_size, D)
            + 2 * D * dtype_bytes)  # fmt: skip


def decode_bytes_per_step(cfg: ModelConfig, batch: int, context: int = 0) -> float:
    """Expected bytes a decode step of `batch` sequences reads when each token picks its k of E
    experts uniformly at random (as random router weights do): the dense weights once, each
    expert some token picked once, E * (1 - (1 - k/E)^batch) of them per layer, and every
    sequence's visible K/V (bf16) at `context` tokens. batch 1, context 0: the per-token figure.
    At batch 64 most experts are read every step: the roofline of batched MoE decode."""
    E, k = cfg.num_experts, cfg.experts_per_token
    expert = _expert_bytes(cfg)
    one = decode_bytes_per_token(cfg) - cfg.num_hidden_layers * k * expert  # dense part
    touched = E * (1 - (1 - k / E) ** batch)
    per_token_kv = 2 * cfg.num_key_value_heads * cfg.head_dim * 2  # K and V of one layer, bf16
    seen = sum(min(context, cfg.window(n)) if cfg.window(n) else context
               for n in range(cfg.num_hidden_layers))  # fmt: skip
    return one + cfg.num_hidden_layers * touched * expert + batch * seen * per_token_kv


def _progress(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def random_prompts(cfg: ModelConfig, n: int, length: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    top = min(cfg.vocab_size, 199998)  # ordinary text tokens only
    return [torch.randint(0, top, (length,), generator=g).tolist() for _ in range(n)]


def run_batch(llm: LLM, batch: int, prompt_len: int, gen_len: int) -> BenchResult:
    engine, cfg = llm.engine, llm.engine.model_cfg
    params = SamplingParams(temperature=0, max_tokens=gen_len, ignore_eos=True)
    start = time.perf_counter()
    llm.generate(random_prompts(cfg, 1, prompt_len, 0), SamplingParams(temperature=0, max_tokens=1))
    ttft = time.perf_counter() - start
    ids = [engine.add_request(p, params) for p in random_prompts(cfg, batch, prompt_len, 1)]
    counts = dict.fromkeys(ids, 0)
    decode_start = None
    while engine.has_unfinished():
        for delta in engine.step():
            counts[delta.request_id] += len(delta.token_ids)
        if decode_start is None and all(counts.values()):
            decode_start = time.perf_counter()  # every stream has its first token: decoding
    elapsed = time.perf_counter() - (decode_start or time.perf_counter())
    decoded = batch * (gen_len - 1)
    total = decoded / elapsed if elapsed > 0 else float("nan")
    return BenchResult(batch, ttft, prompt_len / ttft, total / batch, total)


def bench(
    model: str, prompt_len: int, gen_len: int, batches: list[int], dtype: str, device: str = "cpu",
    dense_weights: str = "bf16", mmap_weights: bool = False, tensor_parallel_size: int = 1,
    expert_parallel: bool = False,
) -> dict:  # fmt: skip
    _progress(f"loading {model}")
    max_len = prompt_len + gen_len + 8
    kv = max(batches) * max_len * 200_000 + 64 * 2**20  # generous: KV never limits the bench
    llm = LLM(model, device, dtype=dtype, max_model_len=max_len, kv_cache_memory=kv,
              max_num_seqs=max(batches), max_num_batched_tokens=max(prompt_len, 512),
              dense_weights=dense_weights, mmap_weights=mmap_weights,
              tensor_parallel_size=tensor_parallel_size,
              expert_parallel=expert_parallel)  # fmt: skip
    cfg = llm.engine.model_cfg
    _progress("warming up")
    llm.generate(random_prompts(cfg, 1, 8, 2), SamplingParams(temperature=0, max_tokens=2))
    _progress("measuring memory read bandwidth")
    bw = read_bandwidth_report(device=device)
    bandwidth = bw["gbs"]
    results = []
    for batch in batches:
        _progress(f"batch {batch}: prompt {prompt_len}, generating {gen_len} per stream")
        results.append(run_batch(llm, batch, prompt_len, gen_len))
    step_bytes = decode_bytes_per_token(cfg, dense=dense_weights)
    limit = (
        bandwidth * 1e9 / step_bytes
    )  # batch-1 tokens/s if every byte is read once at full speed
    return {
        "model": model, "dtype": dtype, "dense_weights": dense_weights,
        "mmap_weights": mmap_weights, "prompt_len": prompt_len, "gen_len": gen_len,
        "threads": torch.get_num_threads(), "read_bandwidth_gbs": round(bandwidth, 2),
        "read_bandwidth_reps_gbs": bw["reps_gbs"], "read_bandwidth_method": bw["method"],
        "decode_bytes_per_token": step_bytes, "bandwidth_limit_tok_s": round(limit, 3),
        "results": [r._asdict() for r in results],
        "batch1_fraction_of_bandwidth_limit": round(results[0].decode_tok_s_total / limit, 4)
        if results and results[0].batch == 1 else None,
        "peak_rss_gib": round(peak_rss_gib(), 3), "cpu_kernels": cpu_kernels(device),
        "tensor_parallel_size": tensor_parallel_size, "expert_parallel": expert_parallel,
        "allreduce_bytes_per_token": allreduce_bytes_per_token(cfg, tensor_parallel_size),
    }  # fmt: skip


def allreduce_bytes_per_token(cfg: ModelConfig, ranks: int) -> int:
    """Bytes one rank sends per token over N ranks: two fp32 all-reduces of the hidden state a
    layer (a ring sends 2(N-1)/N of the tensor) and its slice of the gathered logits."""
    if ranks == 1:
        return 0
    ring = 2 * (ranks - 1) / ranks
    reduces = 2 * cfg.num_hidden_layers * cfg.hidden_size * 4 * ring
    return int(reduces + cfg.vocab_size // ranks * 4 * (ranks - 1))


def _ttft(llm: LLM, prompt: list[int]) -> tuple[float, int]:
    """(seconds to the first token, prompt tokens served from the prefix cache)."""
    start = time.perf_counter()
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=1))[0]
    return time.perf_counter() - start, out.num_cached_tokens


def multi_turn(
    model: str, history: int, new_tokens: int, dtype: str, device: str = "cpu",
    dense_weights: str = "bf16", mmap_weights: bool = False, reps: int = 2,
) -> dict:  # fmt: skip
    """A follow-up turn: turn 1 is a `history`-token prompt, turn 2 the same tokens plus
    `new_tokens` more (what a chat client or an agent resends), timed against a fresh prompt of
    `new_tokens` alone, every repetition on new random tokens."""
    _progress(f"loading {model}")
    llm = LLM(model, device, dtype=dtype, max_model_len=history + new_tokens + 8,
              max_num_batched_tokens=512, dense_weights=dense_weights,
              mmap_weights=mmap_weights)  # fmt: skip
    cfg = llm.engine.model_cfg
    _progress("warming up")
    llm.generate(random_prompts(cfg, 1, 8, 2), SamplingParams(temperature=0, max_tokens=2))
    rows = []
    for rep in range(reps):
        _progress(f"rep {rep}: turn 1 ({history} tokens), turn 2 (+{new_tokens}), alone")
        turn1 = random_prompts(cfg, 1, history, 10 + rep)[0]
        t1, _ = _ttft(llm, turn1)
        t2, cached = _ttft(llm, turn1 + random_prompts(cfg, 1, new_tokens, 100 + rep)[0])
        alone, _ = _ttft(llm, random_prompts(cfg, 1, new_tokens, 200 + rep)[0])
        rows.append({"turn1_ttft_s": t1, "turn2_ttft_s": t2, "alone_ttft_s": alone,
                     "turn2_cached_tokens": cached, "turn2_over_alone": t2 / alone})  # fmt: skip
    return {"model": model, "dtype": dtype, "history": history, "new_tokens": new_tokens,
            "threads": torch.get_num_threads(), "reps": rows}  # fmt: skip


def format_multi_turn(report: dict) -> str:
    lines = [f"model {report['model']} ({report['dtype']}, {report['threads']} threads): "
             f"turn 1 = {report['history']} tokens, turn 2 = those + {report['new_tokens']}",
             f"{'rep':>3} {'turn-1 TTFT s':>14} {'turn-2 TTFT s':>14} {'cached':>7} "
             f"{'alone TTFT s':>13} {'turn 2 / alone':>15}"]  # fmt: skip
    for i, r in enumerate(report["reps"]):
        lines.append(f"{i:>3} {r['turn1_ttft_s']:>14.3f} {r['turn2_ttft_s']:>14.3f} "
                     f"{r['turn2_cached_tokens']:>7} {r['alone_ttft_s']:>13.3f} "
                     f"{r['turn2_over_alone']:>15.2f}")  # fmt: skip
    return "\n".join(lines)


def cpu_kernels(device: str) -> str | None:
    """Which CPU kernels ran (None on CUDA): the variant and the instruction sets it used."""
    from moerun.ops import cpu

    if torch.device(device).type != "cpu" or not cpu.available():
        return None
    dot = "vdpbf16ps" if cpu.uses_bf16dot() else "FMAs"
    why = "" if cpu.uses_bf16dot() or not cpu.has_bf16dot() else " (vdpbf16ps measured slower)"
    return (f"{cpu.variant()}, VNNI {'yes' if cpu.has_vnni() else 'no'}, bf16 prefill tiles on "
            f"{dot}{why}")  # fmt: skip


def format_table(report: dict) -> str:
    lines = [f"model {report['model']} ({report['dtype']}, {report['threads']} threads), "
             f"prompt {report['prompt_len']}, gen {report['gen_len']}",
             f"{'batch':>5} {'TTFT s':>8} {'prefill tok/s':>14} {'decode tok/s/stream':>20} "
             f"{'decode tok/s total':>19}"]  # fmt: skip
    for r in report["results"]:
        speeds = f"{r['decode_tok_s_per_stream']:>20.3f} {r['decode_tok_s_total']:>19.3f}"
        lines.append(f"{r['batch']:>5} {r['ttft_s']:>8.3f} {r['prefill_tok_s']:>14.2f} {speeds}")
    frac = report["batch1_fraction_of_bandwidth_limit"]
    lines.append(f"read bandwidth {report['read_bandwidth_gbs']} GB/s "
                 f"({report['read_bandwidth_method']}: {report['read_bandwidth_reps_gbs']}); "
                 "a decode step reads "
                 f"{report['decode_bytes_per_token'] / 1e9:.3f} GB -> limit "
                 f"{report['bandwidth_limit_tok_s']} tok/s")  # fmt: skip
    if frac is not None:
        lines.append(f"batch-1 decode: {100 * frac:.1f}% of the memory-bandwidth limit")
    lines.append(f"peak RSS {report['peak_rss_gib']} GiB")
    if report.get("cpu_kernels"):
        lines.append(f"CPU kernels: {report['cpu_kernels']}")
    return "\n".join(lines)
