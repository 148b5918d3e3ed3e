"""Compile every Triton kernel the CUDA path launches, for a real GPU target, without a GPU.

    python bench/gpu_aot.py [--preset gpt-oss-120b] [--arch 90] [--tokens 1,64,1024] [--check]

Triton's interpreter (the test suite's way to run the kernels on a CPU) accepts code that the
GPU compiler rejects: tl.dot shapes under 16, unsupported ops, register-hungry tiles. This runs
real forward steps of a model on the meta device (shapes, no data), intercepts each kernel launch
with the arguments and constexprs the launchers chose for those shapes, and compiles each
distinct one to a cubin for sm_<arch> with Triton's bundled ptxas. Prints one line per kernel
variant: registers, spills (from ptxas), shared memory. Must run without TRITON_INTERPRET.
"""

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

_TYPES = {torch.bfloat16: "bf16", torch.float32: "fp32", torch.float16: "fp16",
          torch.int32: "i32", torch.int64: "i64", torch.uint8: "u8"}  # fmt: skip


def capture_launches(fn) -> list[tuple]:
    """Run fn() with JITFunction.run replaced: returns (kernel, args, kwargs) per launch."""
    from triton.runtime.jit import JITFunction

    launches = []
    real = JITFunction.run

    def record(self, *args, grid, warmup, **kwargs):
        launches.append((self, args, kwargs))

    JITFunction.run = record
    try:
        fn()
    finally:
        JITFunction.run = real
    return launches


def _signature(kernel, args, kwargs) -> tuple[dict, dict, dict]:
    """(signature, constexprs, options) for triton.compile from one recorded launch."""
    sig, consts = {}, {}
    values = dict(zip([p.name for p in kernel.params], args, strict=False)) | kwargs
    for p in kernel.params:
        v = values[p.name]
        if p.is_constexpr:
            sig[p.name], consts[p.name] = "constexpr", v
        elif isinstance(v, torch.Tensor):
            sig[p.name] = "*" + _TYPES[v.dtype]
        elif isinstance(v, bool):
            sig[p.name] = "i1"
        elif isinstance(v, int):
            sig[p.name] = "i32" if -(2**31) <= v < 2**31 else "i64"
        else:
            sig[p.name] = "fp32"
    options = {k: v for k, v in kwargs.items() if k in ("num_warps", "num_stages")}
    return sig, consts, options


def meta_forward_steps(preset: str, tokens: list[int]) -> None:
    """Decode (1 new token per sequence, like a CUDA graph step) and prefill (one sequence of
    n tokens) forward passes of the preset on the meta device, on the Triton path."""
    from moerun.engine.kv_cache import KVCache
    from moerun.model.config import PRESETS
    from moerun.model.gpt_oss import Transformer
    from moerun.ops.backend import resolve_ops
    from moerun.ops.paged import LayerKV, Paging, StepCache, StepRows

    cfg = PRESETS[preset]
    with torch.device("meta"):  # the Triton ops as chosen for CUDA (only checks triton imports)
        model = Transformer(cfg, ops=resolve_ops("triton", "cuda"))
    model.finish_loading(torch.bfloat16, "meta")  # as loaded for CUDA, shapes only
    kv = KVCache(cfg, 64, 64, 16, torch.bfloat16, "meta")
    i32 = dict(dtype=torch.int32, device="meta")
    for n in tokens:
        decode = n <= 64  # n sequences of one token; else one sequence of n tokens
        B = n if decode else 1
        positions = torch.empty(n, dtype=torch.long, device="meta")
        rows = StepRows(
            positions,
            torch.empty(n, **i32),
            torch.empty(B + 1, **i32),
            torch.empty(B, **i32),
            torch.empty(B, **i32),
            1 if decode else n,
            [],
        )
        paging = Paging(torch.empty(n, dtype=torch.long, device="meta"), torch.empty(B, 64, **i32))
        layers = [LayerKV(k, v, paging) for k, v in zip(kv.k, kv.v, strict=True)]
        with torch.inference_mode():
            hidden = model.forward_batch(positions, StepCache(layers, rows))
            model.logits(hidden)


def compile_all(launches: list[tuple], arch: int) -> list[dict]:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    seen, rows = set(), []
    for kernel, args, kwargs in launches:
        sig, consts, options = _signature(kernel, args, kwargs)
        key = (kernel.__name__, tuple(sorted(sig.items())), tuple(sorted(consts.items())),
               tuple(sorted(options.items())))  # fmt: skip
        if key in seen:
            continue
        seen.add(key)
        src = ASTSource(kernel, signature=sig, constexprs=consts)
        compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
        regs, spills = _ptxas_usage(compiled.asm["ptx"], arch)
        rows.append({"kernel": kernel.__name__, "constexprs": consts, **options,
                     "registers": regs, "spill_bytes": spills,
                     "shared_bytes": compiled.metadata.shared})  # fmt: skip
    return rows


def _ptxas_usage(ptx: str, arch: int) -> tuple[int, int]:
    """(registers per thread, spill stores in bytes) as ptxas -v reports them."""
    from triton.backends.nvidia.compiler import get_ptxas

    ptxas = get_ptxas(arch).path if hasattr(get_ptxas(arch), "path") else get_ptxas(arch)[0]
    target = f"sm_{arch}a" if arch == 90 else f"sm_{arch}"  # what Triton builds for Hopper
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "k.ptx"
        path.write_text(ptx)
        out = subprocess.run([ptxas, "-v", f"-arch={target}", str(path), "-o", f"{tmp}/k.cubin"],
                             capture_output=True, text=True, check=True).stderr  # fmt: skip
    regs = int(re.search(r"Used (\d+) registers", out).group(1))
    spills = int(re.search(r"(\d+) bytes spill stores", out).group(1))
    return regs, spills


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="gpt-oss-120b")
    p.add_argument("--arch", type=int, default=90, help="compute capability: 90 = H100/H200")
    p.add_argument(
        "--tokens",
        default="1,64,1024",
        help="steps to trace: n <= 64 decodes n sequences, else prefills n tokens",
    )
    p.add_argument("--check", action="store_true", help="exit 1 if any variant spills registers")
    args = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("gpu_aot: unset TRITON_INTERPRET (the interpreter compiles nothing)", file=sys.stderr)
        return 2
    tokens = [int(t) for t in args.tokens.split(",")]
    launches = capture_launches(lambda: meta_forward_steps(args.preset, tokens))
    rows = compile_all(launches, args.arch)
    for r in rows:
        print(
            f"{r['kernel']:<22} regs {r['registers']:>3}  spill {r['spill_bytes']:>5} B  "
            f"smem {r['shared_bytes']:>6} B  warps {r.get('num_warps', 4)}  {r['constexprs']}"
        )
    print(f"{len(rows)} kernel variants compiled for sm_{args.arch} from {len(launches)} launches")
    spilling = [r["kernel"] for r in rows if r["spill_bytes"]]
    if spilling:
        print(f"register spills in: {', '.join(spilling)}")
    return 1 if args.check and spilling else 0


if __name__ == "__main__":
    sys.exit(main())
