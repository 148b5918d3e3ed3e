"""SamplingParams validation; sample() and compute_logprobs() against hand-derived values."""

import dataclasses
import math

import pytest
import torch

from moerun.engine.sampler import compute_logprobs, sample
from moerun.sampling import SamplingParams

P = [0.5, 0.3, 0.15, 0.05]  # a small hand-built distribution; logits = log(P)
N = 20_000  # draws per frequency test: 4 sigma is at most 0.014 in probability


def frequencies(logits: list[float], params: SamplingParams, seed: int = 0) -> list[float]:
    """N i.i.d. draws: the same row N times, all rows sharing one generator (drawn in order)."""
    g = torch.Generator().manual_seed(seed)
    rows = torch.tensor(logits).expand(N, -1)
    tokens = sample(rows, [params] * N, [g] * N, vocab_size=len(logits))
    return [tokens.count(t) / N for t in range(len(logits))]


def assert_matches(freq: list[float], expected: list[float]) -> None:
    """Zero-probability tokens never drawn; the others within 4 sigma of their probability."""
    for f, p in zip(freq, expected, strict=True):
        if p == 0:
            assert f == 0, (freq, expected)
        else:
            assert abs(f - p) <= 4 * math.sqrt(p * (1 - p) / N), (freq, expected)


def renormalized(keep: list[int]) -> list[float]:
    total = sum(P[i] for i in keep)
    return [P[i] / total if i in keep else 0.0 for i in range(len(P))]


@pytest.mark.parametrize(
    "field, bad",
    [("temperature", -0.1), ("temperature", math.nan), ("temperature", math.inf),
     ("temperature", "1"), ("top_p", 0.0), ("top_p", 1.5), ("top_p", math.nan), ("top_k", -2),
     ("top_k", 2.0), ("top_k", True), ("min_p", -0.1), ("min_p", 1.1), ("max_tokens", 0),
     ("max_tokens", 8.0), ("max_tokens", True), ("stop_token_ids", [3, -1]),
     ("stop_token_ids", [1.0]), ("stop_token_ids", [False]), ("stop_token_ids", 5),
     ("seed", 1.5), ("seed", True), ("seed", 2**64), ("logprobs", -1), ("logprobs", 21),
     ("logprobs", True), ("prompt_logprobs", 21), ("prompt_logprobs", 1.0),
     ("ignore_eos", 1)],
)  # fmt: skip
def test_invalid_field_raises_naming_it(field: str, bad: object) -> None:
    with pytest.raises(ValueError, match=f"^{field} must be .*, got ") as err:
        SamplingParams(**{field: bad})
    assert "\n" not in str(err.value) and repr(bad) in str(err.value)


def test_valid_params_are_normalized_and_frozen() -> None:
    p = SamplingParams(temperature=0, top_p=1, top_k=-1, min_p=1, max_tokens=1,
                       stop_token_ids=[0, 7], seed=-5, logprobs=0, prompt_logprobs=20)  # fmt: skip
    assert p.greedy and p.top_k == 0 and p.stop_token_ids == (0, 7)
    assert type(p.temperature) is float and type(p.top_p) is float
    assert not SamplingParams().greedy and SamplingParams(top_k=5).top_k == 5
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.temperature = 1.0  # type: ignore[misc]


def test_greedy_is_argmax_with_lowest_id_on_ties() -> None:
    logits = torch.tensor([[1.0, 3.0, 3.0, 2.0], [0.0, -1.0, 5.0, 5.0], [7.0, 7.0, 7.0, 7.0]])
    greedy = SamplingParams(temperature=0)
    gens = [torch.Generator() for _ in range(3)]
    assert sample(logits, [greedy] * 3, gens, vocab_size=4) == [1, 2, 0]


def test_padded_columns_are_never_chosen() -> None:
    logits = torch.tensor([[1.0, 0.0, 2.0, 100.0, 1000.0]])  # vocab 3, columns 3 and 4 padding
    g = [torch.Generator().manual_seed(0)]
    assert sample(logits, [SamplingParams(temperature=0)], g, vocab_size=3) == [2]
    rows = logits.expand(N, -1)
    tokens = sample(rows, [SamplingParams(temperature=5.0)] * N, g * N, vocab_size=3)
    assert set(tokens) == {0, 1, 2}


@pytest.mark.parametrize(
    "params, keep",
    [
        (SamplingParams(top_k=2), [0, 1]),
        (SamplingParams(top_k=3), [0, 1, 2]),
        (SamplingParams(top_p=0.4), [0]),  # the top token is always kept
        (SamplingParams(top_p=0.7), [0, 1]),  # 0.5 < 0.7 <= 0.5 + 0.3
        (SamplingParams(top_p=0.9), [0, 1, 2]),  # 0.8 < 0.9 <= 0.95
        (SamplingParams(min_p=0.2), [0, 1, 2]),  # drops p < 0.2 * 0.5 = 0.1
        (SamplingParams(min_p=0.5), [0, 1]),  # drops p < 0.25
        # top-p on the top-k-renormalized distribution: 0.8 / 0.95 = 0.842 >= 0.83 drops token 2
        (SamplingParams(top_k=3, top_p=0.83), [0, 1]),
        (SamplingParams(top_k=3, top_p=0.9, min_p=0.35), [0, 1]),  # min-p drops 0.15 < 0.175
        (SamplingParams(), [0, 1, 2, 3]),
    ],
)
def test_filters_keep_the_hand_derived_support(params: SamplingParams, keep: list[int]) -> None:
    assert_matches(frequencies([math.log(p) for p in P], params), renormalized(keep))


@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_temperature_scales_logits(temperature: float) -> None:
    logits = [1.0, 0.5, -0.5, -2.0]
    weights = [math.exp(x / temperature) for x in logits]
    expected = [w / sum(weights) for w in weights]
    assert_matches(frequencies(logits, SamplingParams(temperature=temperature)), expected)


@pytest.mark.parametrize("temperature", [1e-30, 1e-39, 1e-45, 1e-50, 1e-300])
def test_tiny_temperature_acts_greedy_without_nan(temperature: float) -> None:
    """1e-50 is 0 in fp32: it used to give 0/0 = nan and the last id (a reserved token)."""
    logits = torch.randn(3, 201088, generator=torch.Generator().manual_seed(1))
    g = [torch.Generator().manual_seed(i) for i in range(3)]
    params = [SamplingParams(temperature=temperature, top_p=p) for p in (1.0, 0.9, 0.5)]
    assert sample(logits, params, g, vocab_size=201088) == logits.argmax(-1).tolist()


def draws(rows: torch.Tensor, params: list[SamplingParams], seeds: list[int]) -> list[list[int]]:
    """50 steps of sample() on a fixed batch -> per row, its 50 tokens."""
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    steps = [sample(rows, params, gens, vocab_size=rows.shape[1]) for _ in range(50)]
    return [list(col) for col in zip(*steps, strict=True)]


@pytest.mark.parametrize("filtered", [True, False])
def test_same_seed_same_tokens_and_batch_does_not_change_a_row(filtered: bool) -> None:
    """A row with filters (sorted draw) and one without (id-order draw) each keep their tokens
    beside rows of the other kind."""
    logits = torch.randn(4, 64, generator=torch.Generator().manual_seed(1))
    mine = SamplingParams(temperature=0.8, top_p=0.95, top_k=40, min_p=0.01)
    others = [SamplingParams(temperature=1.3), SamplingParams(temperature=0), SamplingParams()]
    if not filtered:
        mine, others[0] = SamplingParams(temperature=0.8), mine
    alone = draws(logits[:1], [mine], [123])[0]
    assert alone == draws(logits[:1], [mine], [123])[0]
    assert alone != draws(logits[:1], [mine], [124])[0]
    assert len(set(alone)) > 5  # a real distribution, not a constant
    for pos in (0, 2):  # first and middle of the batch, beside other params and generators
        batch = [logits[1], logits[2], logits[3]]
        batch.insert(pos, logits[0])
        params = others[:pos] + [mine] + others[pos:]
        seeds = [7, 8, 9][:pos] + [123] + [7, 8, 9][pos:]
        assert draws(torch.stack(batch), params, seeds)[pos] == alone


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compute_logprobs_matches_float64_log_softmax(dtype: torch.dtype) -> None:
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(2)).to(dtype)
    ref = torch.log_softmax(logits.double(), dim=-1)  # [3, 50]
    token_ids = torch.tensor([4, 0, 49])
    out = compute_logprobs(logits, token_ids, n=5)
    for r, row in enumerate(out):
        assert row.token_id == token_ids[r].item()
        assert abs(row.logprob - ref[r, row.token_id].item()) < 1e-5
        ids, vals = [t for t, _ in row.top], [v for _, v in row.top]
        assert len(set(ids)) == 5 and vals == sorted(vals, reverse=True)
        # the n largest by value (bf16 has ties, so which tied id comes first is not asserted)
        assert [ref[r, t].item() for t in ids] == ref[r].sort(descending=True).values[:5].tolist()
        assert all(abs(v - ref[r, t].item()) < 1e-5 for t, v in row.top)
    assert [row.top for row in compute_logprobs(logits, token_ids, n=0)] == [[], [], []]


def test_candidate_filter_keeps_what_the_full_sort_keeps() -> None:
    """Filtered rows look at the 512 largest logits first; where the kept tokens lie inside
    them, the answer (tokens, order, logits) equals the full sort's, else the row falls back."""
    from moerun.engine.sampler import _candidates, _filtered_sorted

    g = torch.Generator().manual_seed(3)
    peaked = torch.randn(3000, generator=g) * 0.5
    peaked[[7, 900, 2999, 40, 41]] = torch.tensor([12.0, 11.5, 11.0, 9.0, 9.0])
    flat = torch.randn(3000, generator=g) * 0.1
    cases = [  # (row, params, whether the 512 candidates suffice)
        (peaked, SamplingParams(top_p=0.9), True),
        (peaked, SamplingParams(top_p=0.999999, min_p=0.001), True),
        (flat, SamplingParams(top_k=40), True),
        (flat, SamplingParams(top_k=40, top_p=0.5), True),
        (flat, SamplingParams(top_p=0.9), False),  # the mass is spread over thousands
        (flat, SamplingParams(top_k=600), False),  # more than the candidates
        (torch.zeros(3000), SamplingParams(top_k=3), False),  # ties at the edge: any 512 of them
        (torch.zeros(3000), SamplingParams(min_p=0.5), False),  # every token kept
    ]
    rows = torch.stack([r - r.max() for r, _, _ in cases])
    params = [p for _, p, _ in cases]
    kept, order, ok = _candidates(rows.clone(), params)
    assert ok == [o for _, _, o in cases]
    full, full_order = _filtered_sorted(rows.clone(), params)
    for i in [i for i, o in enumerate(ok) if o]:
        n = int((kept[i] > -torch.inf).sum())
        assert 1 <= n < 512 and int((full[i] > -torch.inf).sum()) == n
        assert order[i, :n].tolist() == full_order[i, :n].tolist()
        assert torch.equal(kept[i, :n], full[i, :n])
    # sample() takes either way and never draws outside the support
    g = [torch.Generator().manual_seed(i) for i in range(len(cases))]
    for _ in range(20):
        tokens = sample(rows, params, g, vocab_size=3000)
        assert all(full[i, full_order[i].tolist().index(t)] > -torch.inf
                   for i, t in enumerate(tokens))  # fmt: skip
