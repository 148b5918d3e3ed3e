"""Attention with learned per-head sinks, causal + sliding-window masks and GQA (spec §2.5).

Reference path in plain torch. It follows the reference's op graph and dtypes (QK and PV in the
activation dtype, softmax over [scores, sink] with one rounding) so bf16 results match the
reference's bf16 results to the last bit wherever the BLAS agrees.

Dims: T = queries, S = keys, K = kv heads, G = query heads per kv head, d = head dim.
"""

from typing import NamedTuple

import torch

QUERY_CHUNK = 256  # bounds the [K, G, chunk, S] score tensor on long sequences


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
