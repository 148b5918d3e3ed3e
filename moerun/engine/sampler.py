"""Batched sampling (greedy, temperature, top-k, top-p, min-p) and log-probabilities.

S = sampled rows, R = rows to score, V = vocabulary columns.
"""

from typing import NamedTuple

import torch

from moerun.sampling import SamplingParams


class TokenLogprobs(NamedTuple):
    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # the n most likely (token, logprob), descending; [] when n == 0


def compute_logprobs(logits: torch.Tensor, token_ids: torch.Tensor, n: int) -> list[TokenLogprobs]:
    """logits [R, V] (any float dtype) -> per row: logprob of token_ids[r] under the raw
    log_softmax (fp32) + top-n. Raw: before temperature and filters, like vLLM's default."""
    assert n >= 0, n
    logprobs = logits.float().log_softmax(-1)  # [R, V]
    chosen = logprobs.gather(1, token_ids.view(-1, 1).to(logprobs.device, torch.long))  # [R, 1]
    top_vals, top_ids = logprobs.topk(min(n, logprobs.shape[1]), dim=-1)  # [R, n], descending
    rows = zip(
        token_ids.tolist(), chosen[:, 0].tolist(), top_ids.tolist(), top_vals.tolist(), strict=True
    )
    return [TokenLogprobs(t, lp, list(zip(ids, vals, strict=True))) for t, lp, ids, vals in rows]


def sample(
    logits: torch.Tensor,
    params: list[SamplingParams],
    generators: list[torch.Generator],
    vocab_size: int,
) -> list[int]:
    """logits [S, V'] (V' >= vocab_size; columns >= vocab_size must never be chosen) -> one
    token id per row. A row's token depends only on its logits, params and generator."""
    assert len(params) == len(generators) == logits.shape[0], "one params and generator per row"
    logits = logits[:, :vocab_size].float()  # [S, V]; padded columns are sliced away, never drawn
    tokens = logits.argmax(-1)  # [S]; greedy rows keep this (the first maximum: lowest id on ties)
    rows = [r for r, p in enumerate(params) if not p.greedy]
    if rows:
        sub = [params[r] for r in rows]
        temp = _column(sub, "temperature", logits)
        scaled = logits[rows]  # [s, V], a copy: changed in place below (201k-column
        # temporaries cost more than the arithmetic). Shift the max to 0 first: a tiny
        # temperature then gives -inf, never inf - inf = nan
        scaled.sub_(scaled.max(-1, keepdim=True).values).div_(temp)
        # One uniform per row from that row's own (host) generator, so batch composition never
        # changes a row.
        u = torch.cat([torch.rand(1, generator=generators[r], dtype=torch.float64) for r in rows])
        picked = torch.empty(len(rows), dtype=torch.long, device=logits.device)
        # Only rows with a filter need their tokens in sorted order; most of those need only
        # the few hundred largest (_candidates), the rest sort the whole vocabulary.
        filtered = [i for i, p in enumerate(sub) if p.top_k > 0 or p.top_p < 1 or p.min_p > 0]
        plain = sorted(set(range(len(rows))) - set(filtered))
        if plain:
            picked[plain] = _draw(scaled[plain], u[plain])
        if filtered:
            picked[filtered] = _draw_filtered(scaled[filtered], [sub[i] for i in filtered],
                                              u[filtered])  # fmt: skip
        tokens[rows] = picked
    return tokens.tolist()


def _draw_filtered(
    logits: torch.Tensor, params: list[SamplingParams], u: torch.Tensor
) -> torch.Tensor:
    """Token ids [n] drawn from rows with top-k/top-p/min-p: from their candidates where those
    hold the answer, from the fully sorted row otherwise."""
    kept, order, ok = _candidates(logits, params)  # [n, C] each
    picked = torch.empty(len(params), dtype=torch.long, device=logits.device)
    done = [i for i, good in enumerate(ok) if good]
    todo = [i for i, good in enumerate(ok) if not good]
    if done:
        picked[done] = order[done].gather(1, _draw(kept[done], u[done]).view(-1, 1))[:, 0]
    if todo:
        kept, order = _filtered_sorted(logits[todo], [params[i] for i in todo])  # [t, V] each
        picked[todo] = order.gather(1, _draw(kept, u[todo]).view(-1, 1))[:, 0]
    return picked


def _draw(logits: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF draw: logits [n, W] (max 0; dropped tokens -inf) and one uniform per row ->
    the column drawn per row [n]. It runs where the logits are, so a GPU step copies token ids
    to the host, not probabilities. A zero-probability column has an empty CDF interval and is
    never drawn."""
    cdf = logits.exp_().cumsum(-1, dtype=torch.float64)  # [n, W], unnormalized
    x = (u.to(cdf.device) * cdf[:, -1]).unsqueeze(1)  # [n, 1], below the total mass
    return torch.searchsorted(cdf, x, right=True).clamp_(max=cdf.shape[1] - 1)[:, 0]


def _column(params: list[SamplingParams], name: str, like: torch.Tensor) -> torch.Tensor:
    return torch.tensor([getattr(p, name) for p in params], device=like.device).view(-1, 1)


def _filtered_sorted(
    logits: torch.Tensor, params: list[SamplingParams]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scaled logits [s, V] -> (logits sorted descending with dropped tokens set to -inf, the
    token ids in that order). One sort serves top-k, top-p and min-p for the whole batch."""
    # stable: equal logits keep id order, so which of them top-k keeps is deterministic
    sorted_logits, order = logits.sort(dim=-1, descending=True, stable=True)  # [s, V]
    drop = _drops(sorted_logits, params, sorted_logits.logsumexp(-1, keepdim=True))
    return sorted_logits.masked_fill(drop, -torch.inf), order


def _drops(vals: torch.Tensor, params: list[SamplingParams], whole: torch.Tensor) -> torch.Tensor:
    """Which of a row's largest logits the filters drop: vals [s, W] sorted descending (the
    whole row, or its first W), whole [s, 1] the logsumexp of the whole row -> drop [s, W]."""
    top_k = _column(params, "top_k", vals)  # [s, 1]; 0 = disabled
    top_p = _column(params, "top_p", vals)
    min_p = _column(params, "min_p", vals)
    drop = (top_k > 0) & (torch.arange(vals.shape[1], device=vals.device) >= top_k)  # [s, W]
    # renormalized after top-k: the mass is the k kept tokens' (within W), else the whole row's
    log_z = torch.where(top_k > 0, vals.masked_fill(drop, -torch.inf).logsumexp(-1, True), whole)
    probs = (vals - log_z).exp().masked_fill(drop, 0.0)  # [s, W]
    mass_before = probs.cumsum(-1) - probs  # probability of all more likely tokens
    # top-p: keep a token while the mass before it is still short of top_p (the first always is);
    # top_p == 1 is skipped so float rounding in the cumsum cannot drop a tail token
    drop |= (top_p < 1) & (mass_before >= top_p)
    # min-p: p / p_max = exp(logit - max logit), which renormalizing after top-k/top-p leaves as is
    drop |= vals - vals[:, :1] < min_p.log()  # log(0) = -inf: never drops
    return drop


CANDIDATES = 512  # tokens a filtered row looks at before falling back to a full sort


def _candidates(
    logits: torch.Tensor, params: list[SamplingParams]
) -> tuple[torch.Tensor, torch.Tensor, list[bool]]:
    """_filtered_sorted over each row's CANDIDATES largest logits only: (kept logits [s, C] in
    _filtered_sorted's order, their token ids [s, C], per row whether that is the whole answer).
    It is, when every kept token's logit is above the C-th largest (so no token outside, nor a
    tie at the edge, could be kept) and top-k, if set, is within C. The probabilities are
    normalized over the whole row (or top-k), as in the full sort."""
    C = min(CANDIDATES, logits.shape[1])
    top_vals, top_ids = logits.topk(C, dim=-1)  # [s, C]; ties at the edge in any order
    ids, by_id = top_ids.sort(-1)  # stable order as the full sort: value down, then id up
    vals, at = top_vals.gather(1, by_id).sort(dim=-1, descending=True, stable=True)
    order = ids.gather(1, at)  # [s, C]
    drop = _drops(vals, params, torch.logsumexp(logits, -1, keepdim=True))
    edge = vals[:, -1:]  # the C-th largest logit
    top_k = _column(params, "top_k", logits)[:, 0]
    ok = ~(~drop & (vals <= edge)).any(-1) & (top_k <= C)
    if logits.shape[1] == C:  # every token is a candidate
        ok[:] = True
    return vals.masked_fill(drop, -torch.inf), order, ok.tolist()
