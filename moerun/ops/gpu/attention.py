"""Paged attention with learned per-head sinks, sliding window and GQA (spec §2.5) in Triton.

K/V live in the paged cache (moerun.ops.paged): per layer [num_blocks, bs, K, d], read
through a block table [B, max_blocks] (logical block j // bs -> physical block, -1 = freed and
never loaded). Query head h = kv * G + g uses kv head kv; the G heads of one kv head share each
loaded K/V tile. Scores, softmax and accumulation are fp32 whatever the activation dtype. The
online softmax starts from the sink (running max = sink, denominator = exp(sink - max) = 1),
which puts the sink in the denominator without a value vector and keeps every max finite.
The torch oracle is moerun.ops.attention.sink_attention.
"""

import os

import torch
import triton
import triton.language as tl

from moerun.ops.gpu.kv_write import RopeArgs, write_kv
from moerun.ops.paged import LayerKV, StepRows

LOG2E = 1.4426950408889634  # exp(x) = exp2(x * log2 e); exp2 is the fast instruction
_LOG2E = tl.constexpr(LOG2E)  # the same, readable inside kernels


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _dot_fp32(t: torch.Tensor) -> bool:
    """fp32 dot operands: fp32 activations (IEEE, not tf32), and the interpreter, whose bf16
    tl.dot gives wrong results. On a GPU bf16 operands feed the tensor cores, fp32 accumulate."""
    return _interpreting() or t.dtype == torch.float32


def _min_tile(n: int) -> int:
    """Compiled tl.dot needs every dimension >= 16; the interpreter takes any (tests use tiny)."""
    return n if _interpreting() else max(n, 16)


@triton.jit
def _dot(a, b, DOT_FP32: tl.constexpr):
    if DOT_FP32:
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        out = tl.dot(a, b)
    return out


@triton.jit
def _key_tiles(q, m_i, l_i, acc, pos, lo, hi, window, bt_row, k_ptr, v_ptr, s_kb, s_ko,
               qk_scale, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
               HEAD_D: tl.constexpr, DOT_FP32: tl.constexpr):  # fmt: skip
    """Online softmax of the rows of q [R, D] over keys lo <= j < hi (positions). pos [R] is
    each row's query position; m_i [R] (log2 units), l_i [R], acc [R, D] the running state."""
    dims = tl.arange(0, HEAD_D)
    for j0 in range(lo // BLOCK_N * BLOCK_N, hi, BLOCK_N):  # tiles aligned to BLOCK_N
        j = j0 + tl.arange(0, BLOCK_N)
        in_range = (j >= lo) & (j < hi)
        phys = tl.load(bt_row + j // BLOCK_SIZE, mask=in_range, other=-1).to(tl.int64)
        live = in_range & (phys >= 0)  # a freed block (-1) is never dereferenced
        off = j % BLOCK_SIZE  # constexpr: shifts, not integer division
        kv_off = phys[:, None] * s_kb + off[:, None] * s_ko + dims[None, :]  # [N, D], K and V
        k = tl.load(k_ptr + kv_off, mask=live[:, None], other=0.0)
        v = tl.load(v_ptr + kv_off, mask=live[:, None], other=0.0)
        s = _dot(q, tl.trans(k), DOT_FP32) * qk_scale  # [R, N], log2 units
        seen = live[None, :] & (j[None, :] <= pos[:, None])
        seen &= (window == 0) | (j[None, :] > pos[:, None] - window)
        s = tl.where(seen, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))  # finite: m_i starts at the sink
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, DOT_FP32)
        m_i = m_new
    return m_i, l_i, acc


@triton.jit
def _prefill_kernel(q_ptr, o_ptr, k_ptr, v_ptr, bt_ptr, cu_ptr, start_ptr, sink_ptr,
                    s_qn, s_qh, s_on, s_oh, s_kb, s_ko, s_kh, s_bt,
                    qk_scale, window, BLOCK_SIZE: tl.constexpr, G: tl.constexpr,
                    G_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    HEAD_D: tl.constexpr, DOT_FP32: tl.constexpr):  # fmt: skip
    """One program: BLOCK_M queries of sequence b x the G heads of kv head kv."""
    b, tile, kv = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    row0 = tl.load(cu_ptr + b)
    n_q = tl.load(cu_ptr + b + 1) - row0
    if tile * BLOCK_M >= n_q:
        return  # the grid is sized for the longest sequence
    # tile row r = query (r // G_PAD) x group member (r % G_PAD): [BLOCK_M * G_PAD] rows
    r = tl.arange(0, BLOCK_M * G_PAD)
    m = tile * BLOCK_M + r // G_PAD
    g = r % G_PAD
    head = kv * G + g
    ok = (m < n_q) & (g < G)
    dims = tl.arange(0, HEAD_D)
    q = tl.load(q_ptr + (row0 + m)[:, None] * s_qn + head[:, None] * s_qh + dims[None, :],
                mask=ok[:, None], other=0.0)  # fmt: skip
    first = tl.load(start_ptr + b) + tile * BLOCK_M  # position of the tile's first query
    last = first + tl.minimum(BLOCK_M, n_q - tile * BLOCK_M) - 1
    lo = tl.where(window > 0, tl.maximum(first - window + 1, 0), 0)  # older keys: no query
    m_i = tl.load(sink_ptr + head, mask=g < G, other=0.0).to(tl.float32) * _LOG2E
    l_i = tl.full([BLOCK_M * G_PAD], 1.0, tl.float32)
    acc = tl.zeros([BLOCK_M * G_PAD, HEAD_D], tl.float32)
    m_i, l_i, acc = _key_tiles(q, m_i, l_i, acc, first + r // G_PAD, lo, last + 1, window,
                               bt_ptr + b * s_bt, k_ptr + kv * s_kh, v_ptr + kv * s_kh,
                               s_kb, s_ko, qk_scale, BLOCK_SIZE, BLOCK_N, HEAD_D,
                               DOT_FP32)  # fmt: skip
    out = acc / l_i[:, None]
    tl.store(o_ptr + (row0 + m)[:, None] * s_on + head[:, None] * s_oh + dims[None, :],
             out.to(o_ptr.dtype.element_ty), mask=ok[:, None])  # fmt: skip


@triton.jit
def _decode_kernel(q_ptr, k_ptr, v_ptr, bt_ptr, len_ptr, sink_ptr, part_m, part_l, part_acc,
                   s_qb, s_qh, s_kb, s_ko, s_kh, s_bt, qk_scale, window,
                   BLOCK_SIZE: tl.constexpr, G: tl.constexpr, ROWS: tl.constexpr,
                   BLOCK_N: tl.constexpr, HEAD_D: tl.constexpr,
                   DOT_FP32: tl.constexpr):  # fmt: skip
    """One program: one split of sequence b's visible keys x the G heads of kv head kv. Writes
    the split's max, denominator (without the sink) and unnormalised accumulator."""
    b, kv, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    n_splits = tl.num_programs(2)  # a runtime value: no recompile per split count
    n = tl.load(len_ptr + b)  # the query sits at n - 1
    lo = tl.where(window > 0, tl.maximum(n - window, 0), 0)
    # splits own whole BLOCK_N-aligned tiles, so no tile is loaded by two programs
    base = lo // BLOCK_N * BLOCK_N
    per_split = tl.cdiv(tl.cdiv(n - base, BLOCK_N), n_splits) * BLOCK_N
    s_lo = tl.maximum(lo, base + split * per_split)
    s_hi = tl.minimum(n, base + (split + 1) * per_split)
    g = tl.arange(0, ROWS)  # rows >= G are padding (ROWS >= 16 for tl.dot)
    head = kv * G + g
    dims = tl.arange(0, HEAD_D)
    q = tl.load(q_ptr + b * s_qb + head[:, None] * s_qh + dims[None, :],
                mask=(g < G)[:, None], other=0.0)  # fmt: skip
    # starting the max at the sink keeps it finite; the sink's exp is added once, in the reduce
    m_i = tl.load(sink_ptr + head, mask=g < G, other=0.0).to(tl.float32) * _LOG2E
    l_i = tl.zeros([ROWS], tl.float32)
    acc = tl.zeros([ROWS, HEAD_D], tl.float32)
    m_i, l_i, acc = _key_tiles(q, m_i, l_i, acc, tl.zeros([ROWS], tl.int32) + n - 1, s_lo, s_hi,
                               window, bt_ptr + b * s_bt, k_ptr + kv * s_kh, v_ptr + kv * s_kh,
                               s_kb, s_ko, qk_scale, BLOCK_SIZE, BLOCK_N, HEAD_D,
                               DOT_FP32)  # fmt: skip
    idx = (b * tl.num_programs(1) * G + head) * n_splits + split  # [B, H, n_splits] flat
    tl.store(part_m + idx, m_i, mask=g < G)
    tl.store(part_l + idx, l_i, mask=g < G)
    tl.store(part_acc + idx[:, None] * HEAD_D + dims[None, :], acc, mask=(g < G)[:, None])


@triton.jit
def _reduce_kernel(part_m, part_l, part_acc, sink_ptr, o_ptr, s_ob, s_oh, H, n_splits,
                   SPLITS_PAD: tl.constexpr, HEAD_D: tl.constexpr):  # fmt: skip
    """One program per (sequence, head): merges the splits and adds the sink's exp."""
    bh = tl.program_id(0)
    sp = tl.arange(0, SPLITS_PAD)
    ok = sp < n_splits
    dims = tl.arange(0, HEAD_D)
    m = tl.load(part_m + bh * n_splits + sp, mask=ok, other=float("-inf"))
    l_s = tl.load(part_l + bh * n_splits + sp, mask=ok, other=0.0)
    acc_off = (bh * n_splits + sp)[:, None] * HEAD_D + dims[None, :]  # [SPLITS_PAD, D]
    acc = tl.load(part_acc + acc_off, mask=ok[:, None], other=0.0)
    sink = tl.load(sink_ptr + bh % H).to(tl.float32) * _LOG2E
    m_all = tl.maximum(tl.max(m, axis=0), sink)
    w = tl.exp2(m - m_all)  # padded splits: exp2(-inf) = 0
    denom = tl.sum(l_s * w, axis=0) + tl.exp2(sink - m_all)
    out = tl.sum(acc * w[:, None], axis=0) / denom
    tl.store(o_ptr + (bh // H) * s_ob + (bh % H) * s_oh + dims, out.to(o_ptr.dtype.element_ty))


def _check(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> tuple[int, int]:
    """(K, G) after checking the layout the kernels assume (unit stride on d, d a power of 2)."""
    H, d = q.shape[1], q.shape[2]
    K = k_cache.shape[2]
    assert k_cache.shape == v_cache.shape and k_cache.shape[3] == d and H % K == 0
    assert d >= 16 and d & (d - 1) == 0, "head dim must be a power of two >= 16"
    assert q.stride(2) == k_cache.stride(3) == 1
    assert k_cache.stride() == v_cache.stride(), "K and V are read with the same offsets"
    return K, H // K


def paged_prefill_attention(
    q: torch.Tensor,  # [N, H, d] new queries of all sequences, RoPE applied
    k_cache: torch.Tensor,  # [num_blocks, bs, K, d], already holding the new keys
    v_cache: torch.Tensor,  # [num_blocks, bs, K, d]
    block_table: torch.Tensor,  # [B, max_blocks] int32, -1 = freed
    cu_seqlens_q: torch.Tensor,  # [B+1] int32, rows of sequence b are cu[b]:cu[b+1]
    q_start: torch.Tensor,  # [B] int32, position of each sequence's first new query
    sinks: torch.Tensor,  # [H]
    sm_scale: float,
    window: int,  # keys visible to a query, itself included; 0 = unlimited
    max_seqlen_q: int | None = None,  # longest cu[b+1]-cu[b]; None reads it back (one sync)
    block_m: int | None = None,  # queries per tile (power of two)
    block_n: int | None = None,  # keys per tile (power of two, >= 16 on a GPU)
) -> torch.Tensor:  # [N, H, d]
    N, H, d = q.shape
    K, G = _check(q, k_cache, v_cache)
    out = torch.empty_like(q)
    B = q_start.shape[0]
    if N == 0 or B == 0:
        return out
    if max_seqlen_q is None:
        max_seqlen_q = int((cu_seqlens_q[1:] - cu_seqlens_q[:-1]).max())
    g_pad = triton.next_power_of_2(G)
    block_m = max(block_m or 128 // g_pad, _min_tile(1) // g_pad, 1)  # ~128 rows per tile
    block_n = _min_tile(block_n or 64)
    warps = 8 if block_m * g_pad * block_n >= 4096 else 4  # sm_90 build: no spills
    grid = (B, triton.cdiv(max_seqlen_q, block_m), K)
    _prefill_kernel[grid](
        q, out, k_cache, v_cache, block_table, cu_seqlens_q, q_start, sinks,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_table.stride(0),
        sm_scale * LOG2E, window, BLOCK_SIZE=k_cache.shape[1], G=G, G_PAD=g_pad, BLOCK_M=block_m,
        BLOCK_N=block_n, HEAD_D=d, DOT_FP32=_dot_fp32(q), num_warps=warps,
    )  # fmt: skip
    return out


def _pick_splits(q: torch.Tensor, programs: int, max_keys: int, block_n: int) -> int:
    """Enough splits to give about two programs per SM, never more than the key tiles. Off a
    GPU (the interpreter) as on an H100's 132 SMs, so the tests split contexts as a GPU would."""
    sms = torch.cuda.get_device_properties(q.device).multi_processor_count if q.is_cuda else 132
    return max(1, min(triton.cdiv(2 * sms, programs), triton.cdiv(max_keys, block_n), 64))


def paged_decode_attention(
    q: torch.Tensor,  # [B, H, d] one query per sequence, RoPE applied
    k_cache: torch.Tensor,  # [num_blocks, bs, K, d], already holding the new key
    v_cache: torch.Tensor,
    block_table: torch.Tensor,  # [B, max_blocks] int32, -1 = freed
    seq_lens: torch.Tensor,  # [B] int32 >= 1; the query sits at seq_lens - 1
    sinks: torch.Tensor,  # [H]
    sm_scale: float,
    window: int,
    num_splits: int | None = None,  # context splits per sequence; None: fill the GPU
    block_n: int | None = None,  # keys per tile (power of two, >= 16 on a GPU)
) -> torch.Tensor:  # [B, H, d]
    B, H, d = q.shape
    K, G = _check(q, k_cache, v_cache)
    out = torch.empty_like(q)
    if B == 0:
        return out
    block_n = _min_tile(block_n or 64)
    if num_splits is None:  # bound the context by the table, not seq_lens: no host sync
        max_keys = block_table.shape[1] * k_cache.shape[1]
        num_splits = _pick_splits(q, B * K, min(max_keys, window or max_keys), block_n)
    rows = max(16, triton.next_power_of_2(G))  # tl.dot needs >= 16 rows on a GPU
    part_m = torch.empty(B, H, num_splits, dtype=torch.float32, device=q.device)
    part_l = torch.empty_like(part_m)
    part_acc = torch.empty(B, H, num_splits, d, dtype=torch.float32, device=q.device)
    _decode_kernel[(B, K, num_splits)](
        q, k_cache, v_cache, block_table, seq_lens, sinks, part_m, part_l, part_acc,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        block_table.stride(0), sm_scale * LOG2E, window, BLOCK_SIZE=k_cache.shape[1], G=G,
        ROWS=rows, BLOCK_N=block_n, HEAD_D=d, DOT_FP32=_dot_fp32(q),
        num_warps=8 if block_n >= 128 else 4,  # sm_90 (bench/gpu_aot.py): 64 keys at 8 warps spill
    )  # fmt: skip
    _reduce_kernel[(B * H,)](
        part_m, part_l, part_acc, sinks, out, out.stride(0), out.stride(1), H, num_splits,
        SPLITS_PAD=triton.next_power_of_2(num_splits), HEAD_D=d,
    )  # fmt: skip
    return out


def paged_attention(
    q: torch.Tensor,  # [N, K, G, d] before RoPE; rotated in place
    k: torch.Tensor,  # [N, K, d] before RoPE
    v: torch.Tensor,  # [N, K, d]
    cos_sin: tuple[torch.Tensor, torch.Tensor],  # [N, d/2] fp32 each
    layer: LayerKV,
    rows: StepRows,
    sinks: torch.Tensor,
    sm_scale: float,
    window: int,
) -> torch.Tensor:  # [N, K*G*d]
    """One layer's attention on the Triton path: RoPE fused into the K/V write, then every
    query reads its keys (cached and new) from the paged cache. Same contract as the torch
    reference moerun.ops.attention.paged_attention."""
    N, K, G, d = q.shape
    q = q.reshape(N, K * G, d)  # a view: head h = kv * G + g
    table = layer.paging.block_table
    write_kv(k, v, layer.k, layer.v, layer.paging.slots, RopeArgs(q, *cos_sin))
    if rows.max_seqlen_q == 1:
        o = paged_decode_attention(q, layer.k, layer.v, table, rows.seq_lens, sinks, sm_scale,
                                   window)  # fmt: skip
    else:
        o = paged_prefill_attention(q, layer.k, layer.v, table, rows.cu_seqlens_q, rows.q_start,
                                    sinks, sm_scale, window, rows.max_seqlen_q)  # fmt: skip
    return o.reshape(N, K * G * d)
