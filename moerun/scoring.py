"""Per-token log-probabilities and perplexity of a given token sequence (`moerun score`)."""

import math
from typing import NamedTuple

import torch

from moerun.errors import MoerunError
from moerun.model.gpt_oss import Transformer

LOGIT_CHUNK = 256  # rows of [chunk, V] fp32 logits alive at once


class ScoreResult(NamedTuple):
    tokens: list[int]
    logprobs: list[float | None]  # None for the first token: nothing predicts it
    perplexity: float


def check_tokens(model: Transformer, tokens: list[int]) -> None:
    cfg = model.cfg
    if len(tokens) < 2:
        raise MoerunError(f"need at least 2 tokens to score, got {len(tokens)}")
    if len(tokens) > cfg.max_position_embeddings:
        raise MoerunError(
            f"{len(tokens)} tokens exceed the context of {cfg.max_position_embeddings}"
        )
    bad = [t for t in tokens if not 0 <= t < cfg.vocab_size]
    if bad:
        raise MoerunError(f"token id {bad[0]} is outside the vocabulary [0, {cfg.vocab_size})")


@torch.inference_mode()
def score(model: Transformer, tokens: list[int]) -> ScoreResult:
    """logprob[i] = log p(tokens[i] | tokens[:i]), from fp32 log-softmax of the logits."""
    check_tokens(model, tokens)
    ids = torch.tensor(tokens, dtype=torch.long, device=model.device)
    hidden = model.hidden(ids)[:-1]  # [T-1, D]: position i predicts token i+1
    targets = ids[1:]
    logprobs: list[float] = []
    for start in range(0, hidden.shape[0], LOGIT_CHUNK):
        logits = model.logits(hidden[start : start + LOGIT_CHUNK]).float()  # [chunk, V]
        chosen = logits.log_softmax(-1).gather(1, targets[start : start + LOGIT_CHUNK, None])
        logprobs += chosen.squeeze(1).tolist()
    perplexity = math.exp(-sum(logprobs) / len(logprobs))
    return ScoreResult(tokens, [None, *logprobs], perplexity)


class Divergence(NamedTuple):
    """How far `model`'s next-token distributions are from `reference`'s on the same tokens
    (what llama.cpp's `llama-perplexity --kl-divergence` reports)."""

    positions: int
    mean_kl: float  # KL(reference || model), nats, averaged over positions
    max_kl: float
    p99_kl: float
    mean_abs_dlogprob: float  # |logprob of the actual next token| difference
    same_top1: float  # fraction of positions whose most likely token agrees


@torch.inference_mode()
def divergence(model: Transformer, reference: Transformer, tokens: list[int]) -> Divergence:
    check_tokens(model, tokens)
    ids = torch.tensor(tokens, dtype=torch.long, device=model.device)
    hidden, ref_hidden = model.hidden(ids)[:-1], reference.hidden(ids)[:-1]
    targets = ids[1:]
    kls, dlp, same = [], [], 0
    for start in range(0, hidden.shape[0], LOGIT_CHUNK):
        rows = slice(start, start + LOGIT_CHUNK)
        lp = model.logits(hidden[rows]).float().log_softmax(-1)  # [chunk, V]
        ref = reference.logits(ref_hidden[rows]).float().log_softmax(-1)
        kls.append((ref.exp() * (ref - lp)).sum(-1))
        t = targets[rows, None]
        dlp.append((lp.gather(1, t) - ref.gather(1, t)).abs().squeeze(1))
        same += int((lp.argmax(-1) == ref.argmax(-1)).sum())
    kl, d = torch.cat(kls).double(), torch.cat(dlp).double()
    return Divergence(len(kl), float(kl.mean()), float(kl.max()),
                      float(kl.quantile(0.99)), float(d.mean()), same / len(kl))  # fmt: skip
