"""Fused K/V cache write for the CUDA path, optionally with RoPE (spec §2.4) applied on the way.

Cache layout as moerun.engine.kv_cache: per layer [num_blocks, bs, K, d]; a token's slot is
block * bs + offset (the index into the [-1, K, d] view); a negative slot means "do not store".
"""

from typing import NamedTuple

import torch
import triton
import triton.language as tl


class RopeArgs(NamedTuple):
    """Fuses RoPE into write_kv: q [N, H, d] is rotated in place, k is rotated on its way into
    the cache (k itself is left as is). cos/sin [N, d/2] fp32 (the model's Rope.cos_sin)."""

    q: torch.Tensor
    cos: torch.Tensor
    sin: torch.Tensor


@triton.jit
def _rotate(x1, x2, cos, sin):
    """Half-split rotation rounded like moerun.ops.attention.apply_rope: cos/sin, each product
    and each sum rounded to the activation dtype (bf16 products of bf16 values are exact in
    fp32)."""
    dt = x1.dtype
    c = cos.to(dt).to(tl.float32)[None, :]
    s = sin.to(dt).to(tl.float32)[None, :]
    a, b = x1.to(tl.float32), x2.to(tl.float32)
    o1 = (a * c).to(dt).to(tl.float32) - (b * s).to(dt).to(tl.float32)
    o2 = (b * c).to(dt).to(tl.float32) + (a * s).to(dt).to(tl.float32)
    return o1.to(dt), o2.to(dt)


@triton.jit
def _write_kv_kernel(k_ptr, v_ptr, kc_ptr, vc_ptr, slot_ptr, q_ptr, cos_ptr, sin_ptr,
                     s_kn, s_kh, s_vn, s_vh, s_kcb, s_kco, s_kch, s_vcb, s_vco, s_vch,
                     s_qn, s_qh, s_cn, K, H, BLOCK_SIZE: tl.constexpr, K_PAD: tl.constexpr,
                     H_PAD: tl.constexpr, HEAD_D: tl.constexpr, ROPE: tl.constexpr):  # fmt: skip
    """One program per token: (rotates q in place,) writes k (rotated) and v to its slot."""
    n = tl.program_id(0)
    slot = tl.load(slot_ptr + n).to(tl.int64)
    half = tl.arange(0, HEAD_D // 2)
    dims = tl.arange(0, HEAD_D)
    kh = tl.arange(0, K_PAD)
    # slot < 0: nothing to write (a [K_PAD] compare: the interpreter rejects scalar masks)
    kh_ok = ((kh < K) & (tl.zeros([K_PAD], tl.int64) + slot >= 0))[:, None]
    kc = kc_ptr + (slot // BLOCK_SIZE) * s_kcb + (slot % BLOCK_SIZE) * s_kco + kh[:, None] * s_kch
    if ROPE:
        cos = tl.load(cos_ptr + n * s_cn + half)
        sin = tl.load(sin_ptr + n * s_cn + half)
        qh = tl.arange(0, H_PAD)[:, None]
        qp = q_ptr + n * s_qn + qh * s_qh + half[None, :]  # [H_PAD, d/2], first halves
        o1, o2 = _rotate(tl.load(qp, mask=qh < H), tl.load(qp + HEAD_D // 2, mask=qh < H), cos, sin)
        tl.store(qp, o1, mask=qh < H)
        tl.store(qp + HEAD_D // 2, o2, mask=qh < H)
        kp = k_ptr + n * s_kn + kh[:, None] * s_kh + half[None, :]
        o1, o2 = _rotate(tl.load(kp, mask=kh_ok), tl.load(kp + HEAD_D // 2, mask=kh_ok), cos, sin)
        tl.store(kc + half[None, :], o1.to(kc_ptr.dtype.element_ty), mask=kh_ok)
        tl.store(kc + HEAD_D // 2 + half[None, :], o2.to(kc_ptr.dtype.element_ty), mask=kh_ok)
    else:
        k = tl.load(k_ptr + n * s_kn + kh[:, None] * s_kh + dims[None, :], mask=kh_ok)
        tl.store(kc + dims[None, :], k.to(kc_ptr.dtype.element_ty), mask=kh_ok)
    v = tl.load(v_ptr + n * s_vn + kh[:, None] * s_vh + dims[None, :], mask=kh_ok)
    vc = vc_ptr + (slot // BLOCK_SIZE) * s_vcb + (slot % BLOCK_SIZE) * s_vco + kh[:, None] * s_vch
    tl.store(vc + dims[None, :], v.to(vc_ptr.dtype.element_ty), mask=kh_ok)


def write_kv(
    k: torch.Tensor,  # [N, K, d]
    v: torch.Tensor,  # [N, K, d]
    k_cache: torch.Tensor,  # [num_blocks, bs, K, d]
    v_cache: torch.Tensor,
    slots: torch.Tensor,  # [N] int, block * bs + offset; < 0 = skip this token
    rope: RopeArgs | None = None,  # rotate q in place and k on its way into the cache
) -> None:
    N, K, d = k.shape
    if N == 0:
        return
    assert k.stride(2) == v.stride(2) == k_cache.stride(3) == v_cache.stride(3) == 1
    q, cos, sin = rope if rope is not None else (k, k, k)  # unused pointers when ROPE=False
    if rope is not None:
        assert q.stride(2) == cos.stride(1) == 1 and cos.stride(0) == sin.stride(0)
    _write_kv_kernel[(N,)](
        k, v, k_cache, v_cache, slots, q, cos, sin,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        q.stride(0), q.stride(1), cos.stride(0), K, q.shape[1], BLOCK_SIZE=k_cache.shape[1],
        K_PAD=triton.next_power_of_2(K), H_PAD=triton.next_power_of_2(q.shape[1]), HEAD_D=d,
        ROPE=rope is not None,
    )  # fmt: skip
