"""The engine on the Triton path (kernels="triton") against the engine on the reference ops.

Without CUDA the Triton kernels run in the interpreter on CPU tensors (fp32): this checks the
wiring end to end, the model runner's block tables and slots, the K/V-first write order, the
sliding-window blocks a chunk holds, decode and prefill kernels, on the same random checkpoint
and prompts as tests/test_engine.py.
"""

import os

import numpy as np
import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported (see test_gpu_moe.py)
pytest.importorskip("triton")

from moerun import LLM, SamplingParams  # noqa: E402
from moerun.config import EngineConfig  # noqa: E402
from moerun.engine.kv_cache import kv_cache_bytes, placement_report  # noqa: E402
from moerun.errors import ConfigError  # noqa: E402
from moerun.ops.backend import resolve_kernels  # noqa: E402

from conftest import SMALL  # noqa: E402

pytestmark = pytest.mark.slow  # Triton's interpreter on the CPU: minutes

GPU = torch.cuda.is_available()
DEV = "cuda" if GPU else "cpu"
# fp32 both ways: the kernels and the reference differ in summation order only
LOGPROB_TOL = 1e-4
# window 8, blocks of 4: sliding blocks are released every other step; 40 and 77 need chunks
LENGTHS = [1, 3, 9, 17, 40, 77]


def _prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(11)
    return [torch.randint(0, SMALL.vocab_size, (n,), generator=g).tolist() for n in LENGTHS]


def _llm(folder, kernels: str, device: str = "cpu", **kw) -> LLM:
    opts = dict(dtype="float32", max_model_len=256, kv_cache_memory="2MiB", block_size=4,
                max_num_batched_tokens=32, kernels=kernels)  # fmt: skip
    return LLM(str(folder), device=device, **{**opts, **kw})


@pytest.fixture(scope="module")
def folder(make_checkpoint):
    return make_checkpoint(SMALL, "hf", seed=4)


@pytest.fixture(scope="module")
def reference(folder):
    llm = _llm(folder, "torch")
    params = SamplingParams(temperature=0, max_tokens=5, logprobs=0, prompt_logprobs=0)
    return llm.generate(_prompts(), params)


def _check_same(got, want) -> None:
    for g, w in zip(got, want, strict=True):
        assert g.token_ids == w.token_ids
        got_lp = [t.logprob for t in g.logprobs]
        want_lp = [t.logprob for t in w.logprobs]
        assert got_lp == pytest.approx(want_lp, abs=LOGPROB_TOL)


def test_triton_engine_equals_reference_engine(folder, reference):
    """Batched: chunked prompts beside decodes (prefill kernel), then decode-only steps."""
    llm = _llm(folder, "triton", DEV)
    assert llm.engine.model.ops.name == "triton"
    params = SamplingParams(temperature=0, max_tokens=5, logprobs=0, prompt_logprobs=0)
    got = llm.generate(_prompts(), params)
    _check_same(got, reference)
    for g, w in zip(got[1:], reference[1:], strict=True):  # every prompt row of every chunk
        assert len(g.prompt_logprobs) == len(g.prompt_token_ids) and g.prompt_logprobs[0] is None
        got_lp = [t.logprob for t in g.prompt_logprobs[1:]]
        want_lp = [t.logprob for t in w.prompt_logprobs[1:]]
        assert got_lp == pytest.approx(want_lp, abs=LOGPROB_TOL)
    llm.engine.blocks.check()
    assert llm.engine.blocks.windowed.num_free == llm.engine.blocks.windowed.num_blocks


def test_decode_graph_buffers_as_the_batch_shrinks(folder, reference):
    """Requests stop one after another: rows that held a sequence last step become padding
    of the graph's batch size, and must neither write K/V nor disturb the others."""
    llm = _llm(folder, "triton", DEV)
    graphs = llm.engine.runner.graphs
    assert graphs is not None and graphs.sizes[:4] == [1, 2, 4, 8]
    engine = llm.engine
    ids = [engine.add_request(p, SamplingParams(temperature=0, max_tokens=1 + i % 5, logprobs=0))
           for i, p in enumerate(_prompts())]  # fmt: skip
    got: dict[str, list] = {r: [] for r in ids}
    while engine.has_unfinished():
        for delta in engine.step():
            got[delta.request_id] += delta.logprobs or []
    for i, (r, want) in enumerate(zip(ids, reference, strict=True)):
        assert [t.token_id for t in got[r]] == want.token_ids[: 1 + i % 5]
        lps = [t.logprob for t in got[r]]
        assert lps == pytest.approx(
            [t.logprob for t in want.logprobs[: 1 + i % 5]], abs=LOGPROB_TOL
        )
    engine.blocks.check()


def test_triton_engine_one_at_a_time_and_preempted(folder, reference):
    """Alone: pure decode steps from the first token on. Squeezed: preemption and recompute."""
    params = SamplingParams(temperature=0, max_tokens=5, logprobs=0)
    llm = _llm(folder, "triton", DEV, max_num_batched_tokens=8, enforce_eager=True)
    assert llm.engine.runner.graphs is None
    alone = [0, 3, 5]  # 1, 17 and 77 tokens: the last in 10 chunks of 8
    _check_same([llm.generate([_prompts()[i]], params)[0] for i in alone],
                [reference[i] for i in alone])  # fmt: skip
    squeezed = _llm(
        folder, "triton", DEV, kv_cache_memory="100KiB", max_model_len=96, max_num_seqs=8
    )
    assert squeezed.engine.blocks.full.num_blocks * 4 < sum(LENGTHS)
    _check_same(squeezed.generate(_prompts(), params), reference)
    assert squeezed.engine.scheduler.num_preemptions > 0


def test_original_layout_fused_qkv_on_the_triton_path(make_checkpoint, reference):
    """The original layout's fused qkv: q and k are views into one projection, rotated in
    place / on the way into the cache. Same weights as the hf folder (synth: by name)."""
    llm = _llm(make_checkpoint(SMALL, "original", seed=4), "triton", DEV)
    params = SamplingParams(temperature=0, max_tokens=5, logprobs=0)
    _check_same(llm.generate(_prompts()[2:5], params), reference[2:5])


def test_kernel_choice_and_errors(monkeypatch):
    assert resolve_kernels("auto", "cuda") == "triton"
    assert resolve_kernels("torch", "cuda") == "torch"
    with pytest.raises(ConfigError, match="run on a CPU"):
        resolve_kernels("cpu", "cuda")
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(ConfigError, match="needs device=cuda"):
        resolve_kernels("triton", "cpu")
    with pytest.raises(ValueError, match="kernels must be one of"):
        EngineConfig("m", kernels="cuda")
    with pytest.raises(ValueError, match="device must be cpu or cuda"):
        EngineConfig("m", device="mps")
    with pytest.raises(ValueError, match="positive or 'auto'"):
        EngineConfig("m", kv_cache_memory=0)
    assert EngineConfig("m", kv_cache_memory="auto").kv_cache_memory == 0
    assert EngineConfig("m").max_num_batched_tokens == 512  # auto: per device
    assert EngineConfig("m", "cuda").max_num_batched_tokens == 2048
    assert EngineConfig("m", "cuda", max_num_batched_tokens=256).max_num_batched_tokens == 256
    assert kv_cache_bytes(EngineConfig("m", kv_cache_memory="auto"), torch.device("cpu")) == 2**31


def test_placement_report_counts_packed_experts(folder):
    llm = _llm(folder, "torch")
    packed, dense = llm.engine.model.weight_bytes()
    c = SMALL
    D, I, E, L = c.hidden_size, c.intermediate_size, c.num_experts, c.num_hidden_layers
    # 4 bits per weight plus one scale byte per 32, for mlp1 [2I, D] and mlp2 [D, I]
    assert packed == L * E * (2 * I * D + D * I) * (1 / 2 + 1 / 32)
    assert dense > 0
    line = placement_report(llm.engine.model, llm.engine.runner.kv)
    assert f"experts MXFP4 {packed / 2**30:.2f} GiB" in line and "KV cache" in line


def test_decode_graph_step_writes_only_its_own_slots(folder):
    """Rows left over from a larger batch are padding: after a 4-sequence step, a 3-sequence
    step (same graph size) must store K/V at exactly its 3 new slots, nothing else."""
    from moerun.engine.cuda_graph import DecodeGraphs
    from moerun.engine.kv_cache import KVCache
    from moerun.model.config import FULL, SLIDING

    model = _llm(folder, "triton", DEV, enforce_eager=True).engine.model
    kv = KVCache(SMALL, 16, 16, 4, torch.float32, DEV)
    kinds = [FULL, SLIDING]
    graphs = DecodeGraphs(model, kv, max_batch=4, max_blocks=4, kinds=kinds)
    tables = np.array([[0, 1], [2, 3], [4, 5], [6, 7]], dtype=np.int32)
    graphs.run([5, 6, 7, 8], [5, 6, 7, 4], dict.fromkeys(kinds, tables))
    for t in kv.k + kv.v:
        t.fill_(3.0)  # as if another sequence had the blocks since
    graphs.run([9, 10, 11], [6, 7, 5], dict.fromkeys(kinds, tables[:3]))
    written = [1 * 4 + 2, 3 * 4 + 3, 5 * 4 + 1]  # block * bs + position % bs
    for t in kv.k + kv.v:
        flat = t.view(-1, t.shape[2] * t.shape[3])
        changed = (flat != 3.0).any(dim=1).nonzero().flatten().tolist()
        assert changed == written


def _bench_module(name: str):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "bench" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_kernels_bench_rows_and_their_byte_counts():
    """bench/gpu_kernels.py, small shapes: every kernel row, bytes from the shapes."""
    from moerun.bench import _expert_bytes
    from moerun.model.config import PRESETS

    gpu_kernels = _bench_module("gpu_kernels")
    report = gpu_kernels.run(PRESETS["gpt-oss-20b"], DEV, reps=1, small=True)
    rows = {(r["kernel"], r["shape"]): r for r in report["rows"]}
    assert len(rows) == 2 + 4 + 2 and all(r["seconds"] > 0 for r in rows.values())
    small = PRESETS["gpt-oss-20b"].replace(num_experts=8, hidden_size=64, intermediate_size=64)
    assert rows["moe", "T=1"]["bytes"] == pytest.approx(4 * _expert_bytes(small))  # its 4 experts
    # decode over 64 cached tokens, K and V, 2 kv heads of 16, fp32 here; the window sees 16
    assert rows["decode attention", "B=2 ctx=64 w=0"]["bytes"] == 2 * 2 * 64 * 2 * 16 * 4
    assert rows["decode attention", "B=2 ctx=64 w=16"]["bytes"] == 2 * 2 * 16 * 2 * 16 * 4
    assert "GB/s" in gpu_kernels.table(report)


def test_gpu_bench_runs_every_phase_to_completion(tmp_path):
    """bench/gpu_bench.py on a small random model (interpreter here, the GPU when present)."""
    gpu_bench = _bench_module("gpu_bench")
    args = gpu_bench.argparse.Namespace(
        preset="small", device=DEV, kernels="triton", prompt_len=12, gen_len=4,
        decode_tokens=5, concurrency=3, budget_s=600, profile=True,
    )  # fmt: skip
    report = gpu_bench.bench(SMALL, args)
    many, b1 = report["concurrent"], report["decode_b1_graphs"]
    assert "graphs_error" not in report
    assert not many["cut"] and many["tokens"] == 3 * 4
    assert b1["tokens"] == report["decode_b1_eager"]["tokens"] == 5
    assert 0 < report["ttft"]["ttft_s"] < b1["seconds"]
    assert "aten::" in report["profile"]["table"]  # CPU ops here; CUDA kernels on a GPU
    lines = gpu_bench.table(report).splitlines()
    assert any(line.startswith("batch-1 decode / bandwidth limit") for line in lines)


def test_bf16_triton_path_within_bf16_tolerance_of_the_cpu_path(folder):
    """bf16 prompt logprobs on the Triton path (on a GPU: tensor cores; in the interpreter the
    kernels upcast bf16 operands, which gives the same products) against the CPU path: on
    average no further from the fp32 values than the CPU's own bf16 values are (x 1.25). The
    mean, not the max: in bf16 two experts' router logits can tie exactly, and torch.topk and
    the Triton router may then pick different ones (both valid), which moves single tokens far.
    In the interpreter this relies on conftest making fp32 -> bf16 round to nearest even."""
    params = SamplingParams(temperature=0, max_tokens=2, prompt_logprobs=0)

    def lps(kernels, device, dtype):
        out = _llm(folder, kernels, device, dtype=dtype).generate(_prompts()[1:], params)
        return torch.tensor([t.logprob for o in out for t in o.prompt_logprobs[1:]])

    exact = lps("torch", "cpu", "float32")
    cpu_err = (lps("torch", "cpu", "bfloat16") - exact).abs()
    triton_err = (lps("triton", DEV, "bfloat16") - exact).abs()
    print(
        f"|logprob - fp32| mean/median/max: triton bf16 {triton_err.mean():.4f} / "
        f"{triton_err.median():.4f} / {triton_err.max():.4f}, reference bf16 "
        f"{cpu_err.mean():.4f} / {cpu_err.median():.4f} / {cpu_err.max():.4f}"
    )
    assert triton_err.mean() <= 1.25 * cpu_err.mean(), (triton_err.mean(), cpu_err.mean())
    assert triton_err.median() <= 1.25 * cpu_err.median(), (triton_err.median(), cpu_err.median())


def test_120b_fits_one_80gb_gpu_with_8gb_left_for_kv():
    """Weights as the loader places them (experts packed MXFP4, the rest bf16, norms fp32),
    counted on the meta device: an H100 80GB (81559 MiB as the driver reports it) holds them,
    its CUDA context (~1 GiB), the activation reserve and at least 8 GiB of K/V."""
    from moerun.config import AUTO_KV_RESERVE
    from moerun.model.config import PRESETS
    from moerun.model.gpt_oss import Transformer

    cfg = PRESETS["gpt-oss-120b"]
    with torch.device("meta"):
        model = Transformer(cfg).to(torch.bfloat16)
    packed, dense = model.weight_bytes()
    D, I, E, L = cfg.hidden_size, cfg.intermediate_size, cfg.num_experts, cfg.num_hidden_layers
    assert packed == L * E * (2 * I * D + D * I) * 17 // 32  # 4 bits + 8 per 32: never bf16
    h100 = 81559 * 2**20
    left = h100 - packed - dense - 2**30 - AUTO_KV_RESERVE
    assert left >= 8 * 2**30, left / 2**30


@pytest.mark.skipif(not GPU, reason="host syncs only exist with CUDA")
def test_graph_decode_step_never_waits_for_the_gpu(folder):
    """Filling the inputs and replaying a captured step: nothing synchronises (any synchronising
    torch call raises in sync-debug mode); the host waits only when it reads the sampled ids."""
    llm = _llm(folder, "triton", DEV, dtype="bfloat16", max_num_seqs=4)
    graphs = llm.engine.runner.graphs
    assert sorted(graphs.graphs) == [1, 2, 4]  # captured on CUDA
    tables = np.array([[0, 1], [2, 3], [4, 5]], dtype=np.int32)
    kinds = llm.engine.runner.kinds
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.inference_mode():
            logits = graphs.run([5, 6, 7], [5, 6, 7], dict.fromkeys(kinds, tables))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert logits.shape == (3, SMALL.vocab_size) and bool(logits.isfinite().all())
