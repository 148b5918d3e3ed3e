"""The one place a backend is chosen: `resolve_ops` turns a kernels name and a device into an
`Ops` value the model receives when it is built. Layers call `ops.linear(...)` and never ask
which backend they run on.

- torch: the readable reference ops (ops/dense.py, ops/attention.py, ops/moe.py), any device;
- cpu: the C kernels of ops/cpu (bf16 / MXFP4 weights read in place), CPU only;
- triton: the Triton kernels of ops/gpu, CUDA (or Triton's interpreter on CPU tensors).
"""

import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

from moerun.errors import ConfigError
from moerun.ops import attention, dense, moe
from moerun.ops.experts import SWIGLU_ALPHA, ExpertWeights
from moerun.ops.int8 import Int8Weight
from moerun.ops.paged import LayerKV, StepRows

KERNELS = ("auto", "cpu", "triton", "torch")


@dataclass(frozen=True)
class Ops:
    """One backend's functions; each has the contract of the reference named beside it."""

    name: str  # "cpu" | "triton" | "torch": for reports and the engine's CUDA-graph choice
    linear: Callable  # dense.linear(x, weight, bias)
    rms_norm: Callable  # dense.rms_norm(x, scale, eps)
    route: Callable  # moe.route(logits, k) -> (ids, weights)
    moe: Callable  # moe.moe_experts(x, ids, weights, experts, limit, residual)
    attention: Callable  # attention.paged_attention(q, k, v, cos_sin, layer, rows, ...)


def _cpu_linear(
    x: torch.Tensor, weight: torch.Tensor | Int8Weight, bias: torch.Tensor | None
) -> torch.Tensor:
    """Weights read in place, fp32 accumulation in an order that does not depend on how many
    rows share the call (MKL's GEMM picks its order by shape), one rounding; 8-bit weights:
    exact integer dot products."""
    from moerun.ops import cpu

    xf = x.float().contiguous()
    if isinstance(weight, Int8Weight):
        return cpu.int8_linear(xf, weight, bias).to(x.dtype)
    if weight.dtype == torch.bfloat16:  # bf16 activations: vdpbf16ps where the CPU has it
        bf16 = x.dtype == torch.bfloat16
        return cpu.bf16_linear(xf, weight, bias, x_bf16=bf16).to(x.dtype)
    return cpu.f32_linear(xf, weight.contiguous(), bias).to(x.dtype)


def _cpu_rms_norm(x: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
    from moerun.ops import cpu

    return cpu.rms_norm(x.contiguous(), scale, eps)


def _cpu_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos_sin: tuple[torch.Tensor, torch.Tensor],
    layer: LayerKV, rows: StepRows, sinks: torch.Tensor, sm_scale: float, window: int,
) -> torch.Tensor:  # fmt: skip
    """The reference's RoPE and K/V write, then each query row over its cached keys in C, in a
    fixed key order per row (batch invariant), fp32."""
    from moerun.ops import cpu

    N, K, G, d = q.shape
    q = attention.rope_and_write(q, k, v, cos_sin, layer)
    i32 = lambda t: t.to(torch.int32).contiguous()  # noqa: E731
    o = cpu.paged_attention(
        q.reshape(N, K * G, d).float().contiguous(),
        layer.k,
        layer.v,
        i32(layer.paging.block_table),
        i32(rows.seq_of_row),
        i32(rows.positions),
        sinks.float().contiguous(),
        sm_scale,
        window,
    )
    return o.reshape(N, K * G * d).to(q.dtype)  # fmt: skip


def _cpu_moe(
    x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, w: ExpertWeights, limit: float,
    residual: torch.Tensor | None = None,
) -> torch.Tensor:  # fmt: skip
    from moerun.ops import cpu

    # bf16 activations already carry 8-bit mantissas: decode may round them to 16-bit integers
    # per block for the integer-dot kernel (ops/cpu/mxfp4_vnni.c)
    quantize = x.dtype == torch.bfloat16
    y = cpu.moe_experts(x.float().contiguous(), ids.contiguous(), weights.float().contiguous(),
                        w, limit, SWIGLU_ALPHA, quantize_x=quantize).to(x.dtype)  # fmt: skip
    return y if residual is None else residual + y


def _check_triton(cuda: bool) -> None:
    try:
        import triton  # noqa: F401
    except ImportError:
        raise ConfigError("kernels=triton needs the triton package") from None
    if not cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise ConfigError("kernels=triton needs device=cuda (or TRITON_INTERPRET=1)")


def resolve_kernels(kernels: str, device: str | torch.device) -> str:
    """ "auto" -> "cpu" on a CPU (when the C kernels build), "triton" on CUDA; checks the rest."""
    from moerun.ops import cpu

    if kernels not in KERNELS:
        raise ConfigError(f"kernels must be one of {', '.join(KERNELS)}, not {kernels!r}")
    cuda = torch.device(device).type == "cuda"
    if kernels == "auto":
        kernels = "triton" if cuda else "cpu" if cpu.available() else "torch"
    if kernels == "cpu" and (cuda or not cpu.available()):
        why = "they run on a CPU" if cuda else "they could not be built"
        raise ConfigError(f"kernels=cpu was asked for but {why}")
    if kernels == "triton":
        _check_triton(cuda)
    return kernels


def resolve_ops(kernels: str = "auto", device: str | torch.device = "cpu") -> Ops:
    """The backend for `kernels` on `device` (see resolve_kernels), built once."""
    name = resolve_kernels(kernels, device)
    if name == "triton":
        from moerun.ops.gpu.attention import paged_attention
        from moerun.ops.gpu.moe import triton_moe
        from moerun.ops.gpu.moe_align import triton_route
        from moerun.ops.gpu.norm import rms_norm

        # the MoE's residual add rides in its last kernel: one launch a layer fewer at decode
        return Ops(name, dense.linear, rms_norm, triton_route, triton_moe, paged_attention)
    if name == "cpu":
        return Ops(name, _cpu_linear, _cpu_rms_norm, moe.route, _cpu_moe, _cpu_attention)
    return Ops(name, dense.linear, dense.rms_norm, moe.route, moe.moe_experts,
               attention.paged_attention)  # fmt: skip
