"""Attention with learned per-head sinks, causal + sliding-window masks and GQA (spec §2.5).

Reference path in plain torch over the paged cache (moerun.ops.paged). It follows the reference's
op graph and dtypes (QK and PV in the activation dtype, softmax over [scores, sink] with one
rounding) so bf16 results match the reference's bf16 results to the last bit wherever the BLAS
agrees.

Dims: T = queries, S = keys, K = kv heads, G = query heads per kv head, d = head dim.
"""

import torch

from moerun.ops.paged import LayerKV, StepRows, table_slots

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


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, ..., d]; cos/sin [T, d/2] fp32, cast to x's dtype first as the reference does.
    Half-split pairs (i, i + d/2)."""
    shape = (x.shape[0],) + (1,) * (x.dim() - 2) + (cos.shape[-1],)
    cos, sin = cos.reshape(shape).to(x.dtype), sin.reshape(shape).to(x.dtype)
    x1, x2 = torch.chunk(x, 2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def write_kv(layer: LayerKV, k: torch.Tensor, v: torch.Tensor) -> None:
    """Store the step's K [N, K, d] (RoPE applied) and V at their slots; negative slots (padding)
    are skipped."""
    _, _, K, d = layer.k.shape
    slots = layer.paging.slots
    keep = slots >= 0
    if not bool(keep.all()):
        slots, k, v = slots[keep], k[keep], v[keep]
    layer.k.view(-1, K, d).index_copy_(0, slots, k)
    layer.v.view(-1, K, d).index_copy_(0, slots, v)


def rope_and_write(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos_sin: tuple[torch.Tensor, torch.Tensor],
    layer: LayerKV,
) -> torch.Tensor:  # fmt: skip
    """RoPE on q [N, K, G, d] and k [N, K, d]; K/V into the cache. Returns the rotated q."""
    write_kv(layer, apply_rope(k, *cos_sin), v)
    return apply_rope(q, *cos_sin)


def paged_attention(
    q: torch.Tensor,  # [N, K, G, d] before RoPE
    k: torch.Tensor,  # [N, K, d] before RoPE
    v: torch.Tensor,  # [N, K, d]
    cos_sin: tuple[torch.Tensor, torch.Tensor],  # [N, d/2] fp32 each
    layer: LayerKV,
    rows: StepRows,
    sinks: torch.Tensor,  # [K*G]
    sm_scale: float,
    window: int,  # 0 = full causal
) -> torch.Tensor:  # [N, K*G*d]
    """One layer's attention, reference: K/V written to the cache first, then each sequence's
    queries read every key they can see (cached and new) back from the cache."""
    q = rope_and_write(q, k, v, cos_sin, layer)
    return attend_cached(q, layer, rows, sinks, sm_scale, window)


def attend_cached(
    q: torch.Tensor, layer: LayerKV, rows: StepRows, sinks: torch.Tensor, sm_scale: float,
    window: int,
) -> torch.Tensor:  # fmt: skip
    """q [N, K, G, d] (RoPE applied) against keys read from the cache -> [N, K*G*d]."""
    N, K, G, d = q.shape
    flat_k, flat_v = layer.k.view(-1, K, d), layer.v.view(-1, K, d)
    bs = layer.k.shape[1]
    out = torch.empty(N, K * G * d, dtype=q.dtype, device=q.device)
    for i, (r0, r1, start) in enumerate(rows.seqs):
        end = start + r1 - r0
        first = max(0, start - window + 1) if window else 0  # earliest key the chunk can see
        k_pos = torch.arange(first, end, device=q.device)
        seq = torch.full_like(k_pos, i)
        slots = table_slots(layer.paging.block_table, seq, k_pos, bs)  # [S]
        q_pos = rows.positions[r0:r1]
        if end - first <= KEY_CHUNK:
            out[r0:r1] = sink_attention(q[r0:r1], flat_k[slots], flat_v[slots], sinks, sm_scale,
                                        window, q_pos, k_pos)  # fmt: skip
            continue
        chunks = [  # gathered lazily: at most one key chunk alive
            lambda part=slots[c : c + KEY_CHUNK], pos=k_pos[c : c + KEY_CHUNK]: (
                flat_k[part], flat_v[part], pos)
            for c in range(0, end - first, KEY_CHUNK)
        ]  # fmt: skip
        for c0 in range(r0, r1, QUERY_CHUNK):  # bounds [K, G, queries, KEY_CHUNK] scores
            c1 = min(c0 + QUERY_CHUNK, r1)
            o = online_attention(q[c0:c1], chunks, sinks, sm_scale, window, rows.positions[c0:c1])
            out[c0:c1] = o.reshape(c1 - c0, -1)
    return out


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
