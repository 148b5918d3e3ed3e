"""Attention with learned per-head sinks, causal + sliding-window masks and GQA (spec §2.5).

Reference path in plain torch. It follows the reference's op graph and dtypes (QK and PV in the
activation dtype, softmax over [scores, sink] with one rounding) so bf16 results match the
reference's bf16 results to the last bit wherever the BLAS agrees.

Dims: T = queries, S = keys, K = kv heads, G = query heads per kv head, d = head dim.
"""

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
