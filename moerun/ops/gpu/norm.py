"""RMSNorm in one Triton kernel: the CUDA counterpart of `moerun.model.gpt_oss.RMSNorm`.

The torch module runs ~8 elementwise kernels per call (twice a layer); in a decode step, where
each is tiny, their launches rather than their bytes cost the time. Same numerics: fp32
statistics and scale, one rounding back to the activation dtype; only the order of the mean's
sum differs.
"""

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_kernel(x_ptr, scale_ptr, out_ptr, D, eps, s_x, s_o, BLOCK_D: tl.constexpr):
    """One program per row: out = x * rsqrt(mean(x^2) + eps) * scale."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    ok = cols < D
    x = tl.load(x_ptr + row * s_x + cols, mask=ok, other=0.0).to(tl.float32)
    r = 1.0 / tl.sqrt_rn(tl.sum(x * x, axis=0) / D + eps)  # IEEE sqrt, as torch's rsqrt rounds
    scale = tl.load(scale_ptr + cols, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * s_o + cols, (x * r * scale).to(out_ptr.dtype.element_ty), mask=ok)


def rms_norm(x: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
    """x [T, D] (unit stride on D), scale [D] fp32 -> [T, D] in x's dtype."""
    T, D = x.shape
    assert x.stride(1) == 1 and scale.is_contiguous()
    out = torch.empty(T, D, dtype=x.dtype, device=x.device)
    if T:
        block = triton.next_power_of_2(D)
        _rms_norm_kernel[(T,)](x, scale, out, D, eps, x.stride(0), out.stride(0), BLOCK_D=block,
                               num_warps=8 if block >= 2048 else 4)  # fmt: skip
    return out
