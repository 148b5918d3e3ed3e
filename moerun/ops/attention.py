"""Attention with learned per-head sinks, causal + sliding-window masks and GQA (spec §2.5).

Reference path in plain torch. It follows the reference's op graph and dtypes (QK and PV in the
activation dtype, softmax over [scores, sink] with one rounding) so bf16 results match the
reference's bf16 results to the last bit wherever the BLAS agrees.

Dims: T = queries, S = keys, K = kv heads, G = query heads per kv head, d = head dim.
"""

from typing import NamedTuple

import torch

QUERY_CHUNK = 256  # bounds the [K, G, chunk, S] score tensor on long sequences
# Past this many keys a sequence's cached K/V stream through an online softmax in chunks, so a
# long context never gathers all its keys nor holds a [heads x context] score matrix at once.
KEY_CHUNK = 2048


def sink_attention(
    q: torch.Tensor,  # [T, K, G, d], RoPE applied
    k: torch.Tensor,  # [S, K, d], RoPE applied
    v: torch.Tensor,  # [S, K, d]
    sinks: torch.Tensor,  # [K*G] one logit per query head, in the activation dtype
    sm_scale: float,
    window: int,  # keys visible to a query, itself included; 0 = unlimited
    q_pos: torch.Tensor,  # [T] absolute positions of the queries
    k_pos: torch.Tensor,  # [S] absolute positions of the keys
) -> torch.Tensor:  # [T, K*G*d], head-major (h = kv*G + g), the input order of attn.out
    T, K, G, d = q.shape
    out = torch.empty(T, K, G, d, dtype=q.dtype, device=q.device)
    for start in range(0, T, QUERY_CHUNK):
        end = min(start + QUERY_CHUNK, T)
        out[start:end] = _attend(
            q[start:end], k, v, sinks, sm_scale, window, q_pos[start:end], k_pos
        )
    return out.reshape(T, K * G * d)


def _attend(q, k, v, sinks, sm_scale, window, q_pos, k_pos) -> torch.Tensor:
    T, K, G, _ = q.shape
    S = k.shape[0]
    scores = torch.einsum("tkgd,skd->kgts", q, k)  # [K, G, T, S]
    scores *= sm_scale
    visible = k_pos[None, :] <= q_pos[:, None]  # [T, S] causal
    if window > 0:
        visible &= k_pos[None, :] > q_pos[:, None] - window
    scores.masked_fill_(~visible, float("-inf"))
    # the sink is one extra logit per head in the denominator, with no value vector
    sink = sinks.reshape(K, G, 1, 1).expand(K, G, T, 1)
    weights = torch.softmax(torch.cat([scores, sink], dim=-1), dim=-1)[..., :S]
    return torch.einsum("kgts,skd->tkgd", weights, v)  # [T, K, G, d]


class SeqRows(NamedTuple):
    """One sequence's slice of a ragged batch: rows [row_start, row_end) hold positions
    [start, start + row_end - row_start)."""

    row_start: int
    row_end: int
    start: int


class CacheIO(NamedTuple):
    """Where one layer kind reads cached K/V and writes new K/V (flat slots of [-1, K, d])."""

    read_slots: list[torch.Tensor]  # per sequence: slots of positions [read_first, start)
    read_first: list[int]
    write_rows: torch.Tensor  # [W] batch rows whose K/V later steps will read
    write_slots: torch.Tensor  # [W]


class PagedIO(NamedTuple):
    """One layer kind's paged-cache addressing for the Triton path, as device tensors. Unlike
    CacheIO, every new token's K/V is written first and attention then reads all keys, cached
    and new, from the cache (moerun.ops.gpu.attention.paged_attention)."""

    slots: torch.Tensor  # [N] int64: cache slot of each new token, -1 = not stored
    block_table: torch.Tensor  # [B, max_blocks] int32: logical -> physical block, -1 = none
    cu_seqlens_q: torch.Tensor  # [B+1] int32: rows of sequence b are cu[b]:cu[b+1]
    q_start: torch.Tensor  # [B] int32: position of each sequence's first new token
    seq_lens: torch.Tensor  # [B] int32: q_start + new tokens
    max_seqlen_q: int  # 1: every sequence decodes one token (the split-context kernel)


def table_slots(
    table: torch.Tensor, seq: torch.Tensor, positions: torch.Tensor, block_size: int
) -> torch.Tensor:  # [N] int64
    """Cache slot of each new token: its sequence's block for the position, times the block
    size, plus the offset. table [B, max_blocks]; seq, positions [N]. A -1 block gives a
    negative slot: the token is not stored."""
    return table[seq, positions // block_size].long() * block_size + positions % block_size


def batch_attention(
    q: torch.Tensor,  # [N, K, G, d] RoPE applied, N = all new tokens of the batch
    k: torch.Tensor,  # [N, K, d]
    v: torch.Tensor,  # [N, K, d]
    positions: torch.Tensor,  # [N]
    seqs: list[SeqRows],
    sinks: torch.Tensor,
    sm_scale: float,
    window: int,
    cache: tuple[torch.Tensor, torch.Tensor, CacheIO] | None = None,  # k/v [B, bs, K, d]
) -> torch.Tensor:  # [N, K*G*d]
    """Each sequence attends to its cached K/V plus its new K/V. All reads happen before the
    writes, so blocks released and reused within one step are read before they are overwritten."""
    N, K, G, d = q.shape
    out = torch.empty(N, K * G * d, dtype=q.dtype, device=q.device)
    flat_k = flat_v = None
    if cache is not None:
        flat_k, flat_v = cache[0].view(-1, K, d), cache[1].view(-1, K, d)
    for i, (r0, r1, start) in enumerate(seqs):
        keys, values, first = k[r0:r1], v[r0:r1], start
        if cache is not None and cache[2].read_slots[i].numel() + r1 - r0 > KEY_CHUNK:
            chunks = _key_chunks(flat_k, flat_v, cache[2].read_slots[i], cache[2].read_first[i],
                                 keys, values, start)  # fmt: skip
            for c0 in range(r0, r1, QUERY_CHUNK):  # bounds [K, G, queries, KEY_CHUNK] scores
                c1 = min(c0 + QUERY_CHUNK, r1)
                out[c0:c1] = online_attention(q[c0:c1], chunks, sinks, sm_scale, window,
                                              positions[c0:c1]).reshape(c1 - c0, -1)  # fmt: skip
            continue
        if cache is not None and cache[2].read_slots[i].numel():
            slots = cache[2].read_slots[i]
            keys = torch.cat([flat_k[slots], keys])  # [S, K, d], positions [first, start + n)
            values = torch.cat([flat_v[slots], values])
            first = cache[2].read_first[i]
        k_pos = torch.arange(first, start + r1 - r0, device=q.device)
        out[r0:r1] = sink_attention(
            q[r0:r1], keys, values, sinks, sm_scale, window, positions[r0:r1], k_pos
        )
    if cache is not None and cache[2].write_rows.numel():
        io = cache[2]
        flat_k.index_copy_(0, io.write_slots, k[io.write_rows])
        flat_v.index_copy_(0, io.write_slots, v[io.write_rows])
    return out


def _key_chunks(flat_k, flat_v, slots, first, new_k, new_v, start) -> list:
    """(k, v, positions) chunks: cached keys in slices of KEY_CHUNK, gathered lazily, then the
    new keys. A generator-like list of closures keeps at most one gathered chunk alive."""
    chunks = []
    for c0 in range(0, slots.numel(), KEY_CHUNK):
        part = slots[c0 : c0 + KEY_CHUNK]
        pos = torch.arange(first + c0, first + c0 + part.numel(), device=slots.device)
        chunks.append(lambda part=part, pos=pos: (flat_k[part], flat_v[part], pos))
    new_pos = torch.arange(start, start + new_k.shape[0], device=new_k.device)
    chunks.append(lambda: (new_k, new_v, new_pos))
    return chunks


def online_attention(
    q: torch.Tensor,  # [T, K, G, d]
    chunks: list,  # callables returning (k [C, K, d], v [C, K, d], positions [C])
    sinks: torch.Tensor,  # [K*G]
    sm_scale: float,
    window: int,
    q_pos: torch.Tensor,  # [T]
) -> torch.Tensor:  # [T, K, G, d]
    """Same result as sink_attention (in fp32), one key chunk at a time (flash-decoding style).
    The running max starts at the sink logit and the denominator at exp(sink - max) = 1, so the
    sink is in the softmax without a value vector, and every row has a finite maximum."""
    T, K, G, d = q.shape
    qf = q.float()
    m = sinks.float().reshape(K, G, 1).expand(K, G, T).clone()  # [K, G, T] running max
    denom = torch.ones(K, G, T, device=q.device)
    acc = torch.zeros(K, G, T, d, device=q.device)
    for load in chunks:
        kc, vc, pos = load()
        s = torch.einsum("tkgd,ckd->kgtc", qf, kc.float()) * sm_scale  # [K, G, T, C]
        visible = pos[None, :] <= q_pos[:, None]
        if window > 0:
            visible &= pos[None, :] > q_pos[:, None] - window
        s.masked_fill_(~visible, float("-inf"))
        m_new = torch.maximum(m, s.amax(-1))
        p = torch.exp(s - m_new[..., None])
        rescale = torch.exp(m - m_new)
        denom = denom * rescale + p.sum(-1)
        acc = acc * rescale[..., None] + torch.einsum("kgtc,ckd->kgtd", p, vc.float())
        m = m_new
    return (acc / denom[..., None]).permute(2, 0, 1, 3).to(q.dtype)
