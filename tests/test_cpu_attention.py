"""cpu.paged_attention (attention.c) against the torch reference sink_attention, and its batch
invariance: a row computed alone is bitwise the row computed among others.

Caches are built the way the engine holds them: each sequence's blocks scattered over shuffled
physical blocks, blocks wholly before a sliding window marked -1 (their physical blocks never
allocated), and every unused physical block filled with NaN, so that a read of the wrong slot
shows in the output.
Dims: N query rows, B sequences, K kv heads, G query heads per kv head, d head dim, bs block size.
"""

from typing import NamedTuple

import pytest
import torch

from moerun.ops import cpu
from moerun.ops.attention import sink_attention

pytestmark = pytest.mark.skipif(
    not cpu.available(), reason="moerun's CPU kernels could not be built (no working C compiler)"
)
VARIANTS = [
    pytest.param(v, marks=pytest.mark.skipif(v not in cpu.variants(), reason=f"CPU lacks {v}"))
    for v in ("avx512", "avx2", "scalar")
]


class Batch(NamedTuple):
    q: torch.Tensor  # [N, H, d]
    k_cache: torch.Tensor  # [blocks, bs, K, d]
    v_cache: torch.Tensor
    table: torch.Tensor  # [B, max_blocks] int32
    seq: torch.Tensor  # [N] int32
    pos: torch.Tensor  # [N] int32
    sinks: torch.Tensor  # [H]
    keys: list[torch.Tensor]  # per sequence [L, K, d] (cache dtype), for the reference
    values: list[torch.Tensor]


def make_batch(
    lengths: list[int], queries: list[int], window: int, K: int, G: int, d: int, bs: int,
    dtype: torch.dtype, seed: int,
) -> Batch:  # fmt: skip
    """Sequence b holds keys 0..lengths[b]-1 and asks queries[b] rows: its last positions."""
    g = torch.Generator().manual_seed(seed)
    B, max_blocks = len(lengths), max(-(-L // bs) for L in lengths) + 1
    keys = [torch.randn(L, K, d, generator=g).to(dtype) for L in lengths]
    values = [torch.randn(L, K, d, generator=g).to(dtype) for L in lengths]
    first = [L - n for L, n in zip(lengths, queries, strict=True)]  # first query position
    # logical blocks a query can see: from the window's start of the first query on
    needed = [
        range((max(0, f - window + 1) if window else 0) // bs, -(-L // bs))
        for f, L in zip(first, lengths, strict=True)
    ]
    count = sum(len(r) for r in needed) + 3  # 3 spare blocks, never referenced
    physical = torch.randperm(count, generator=g).tolist()
    k_cache = torch.full((count, bs, K, d), float("nan"), dtype=dtype)
    v_cache = torch.full((count, bs, K, d), float("nan"), dtype=dtype)
    table = torch.full((B, max_blocks), -1, dtype=torch.int32)
    for b, blocks in enumerate(needed):
        for j in blocks:
            phys = physical.pop()
            table[b, j] = phys
            n = min(bs, lengths[b] - j * bs)
            k_cache[phys, :n] = keys[b][j * bs : j * bs + n]
            v_cache[phys, :n] = values[b][j * bs : j * bs + n]
    seq = torch.tensor([b for b, n in enumerate(queries) for _ in range(n)], dtype=torch.int32)
    pos = torch.cat([torch.arange(f, L) for f, L in zip(first, lengths, strict=True)]).int()
    q = torch.randn(len(seq), K * G, d, generator=g)
    sinks = torch.randn(K * G, generator=g)
    return Batch(q, k_cache, v_cache, table, seq, pos, sinks, keys, values)


def reference(batch: Batch, K: int, sm_scale: float, window: int) -> torch.Tensor:  # [N, H, d]
    """sink_attention per sequence over its keys taken from the per-sequence tensors."""
    N, H, d = batch.q.shape
    out = torch.empty(N, H, d)
    for b, (k, v) in enumerate(zip(batch.keys, batch.values, strict=True)):
        rows = (batch.seq == b).nonzero().flatten()
        if rows.numel() == 0:
            continue
        q = batch.q[rows].reshape(-1, K, H // K, d)
        k_pos = torch.arange(k.shape[0])
        y = sink_attention(q, k.float(), v.float(), batch.sinks, sm_scale, window,
                           batch.pos[rows].long(), k_pos)  # fmt: skip
        out[rows] = y.reshape(-1, H, d)
    return out


def run(batch: Batch, sm_scale: float, window: int, variant: str) -> torch.Tensor:
    b = batch
    return cpu.paged_attention(b.q, b.k_cache, b.v_cache, b.table, b.seq, b.pos, b.sinks,
                               sm_scale, window, variant=variant)  # fmt: skip


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("window", [0, 5, 40])
@pytest.mark.parametrize(("K", "G", "d"), [(2, 3, 8), (1, 4, 16), (2, 2, 64)])
def test_matches_sink_attention(K: int, G: int, d: int, window: int, dtype, variant: str) -> None:
    """Several sequences (one longer than two online-softmax chunks of 64 keys), prefill chunks
    and decode rows, shuffled blocks of 16, NaN everywhere a row must not read."""
    batch = make_batch([1, 37, 150, 20], [1, 5, 9, 1], window, K, G, d, 16, dtype, seed=d + window)
    sm_scale = d**-0.5
    got = run(batch, sm_scale, window, variant)
    torch.testing.assert_close(got, reference(batch, K, sm_scale, window), rtol=1e-5, atol=2e-6)


@pytest.mark.parametrize("variant", VARIANTS)
def test_large_sink_and_peaked_scores(variant: str) -> None:
    """A sink far above every score leaves almost nothing to the values; scaled-up queries make
    one key win; both push the running max and the rescaling to their extremes. Scores near 100
    carry fp32 roundings near 100 * 2**-24 on either side, which move their weights by as much
    relatively: hence the wider tolerance of the second case."""
    batch = make_batch([90, 3], [4, 3], 0, 2, 2, 16, 8, torch.float32, seed=7)
    for sinks, q, atol in ((batch.sinks + 30, batch.q, 2e-6), (batch.sinks, batch.q * 40, 2e-5)):
        b = batch._replace(sinks=sinks, q=q)
        torch.testing.assert_close(run(b, 0.25, 0, variant), reference(b, 2, 0.25, 0),
                                   rtol=1e-5, atol=atol)  # fmt: skip


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("window", [0, 24])
def test_batch_invariant(window: int, dtype, variant: str) -> None:
    """Row i alone equals row i among 2, 5, 8, 37 or 300 rows (random others, any order), bit
    for bit; also with 1 thread against 2."""
    lengths = [130, 3, 70, 200, 17]
    batch = make_batch(lengths, [40, 3, 30, 60, 17], window, 2, 4, 64, 16, dtype, seed=11)
    g = torch.Generator().manual_seed(window)
    N = batch.seq.numel()

    def rows(index: torch.Tensor, threads: int | None = None) -> torch.Tensor:
        return cpu.paged_attention(batch.q[index], batch.k_cache, batch.v_cache, batch.table,
                                   batch.seq[index], batch.pos[index], batch.sinks, 0.125,
                                   window, variant=variant, threads=threads)  # fmt: skip

    for i in (0, 45, N - 1):
        alone = rows(torch.tensor([i]))
        for n in (2, 5, 8, 37, 300):
            others = torch.randint(0, N, (n - 1,), generator=g)
            at = int(torch.randint(0, n, (1,), generator=g))
            index = torch.cat([others[:at], torch.tensor([i]), others[at:]])
            assert torch.equal(rows(index)[at], alone[0]), (i, n)
    everything = torch.arange(N)
    assert torch.equal(rows(everything, threads=1), rows(everything, threads=2))


def test_rejects_a_visible_key_in_a_missing_block() -> None:
    batch = make_batch([40], [2], 0, 1, 2, 16, 8, torch.float32, seed=3)
    table = batch.table.clone()
    table[0, 2] = -1  # keys 16..23, visible to both rows
    with pytest.raises(ValueError, match="-1"):
        cpu.paged_attention(batch.q, batch.k_cache, batch.v_cache, table, batch.seq, batch.pos,
                            batch.sinks, 0.25, 0)  # fmt: skip
    with pytest.raises(AssertionError, match="positions"):
        cpu.paged_attention(batch.q, batch.k_cache, batch.v_cache, batch.table, batch.seq,
                            batch.pos + 100, batch.sinks, 0.25, 0)  # fmt: skip
    with pytest.raises(AssertionError, match="int32"):
        cpu.paged_attention(batch.q, batch.k_cache, batch.v_cache, batch.table.long(), batch.seq,
                            batch.pos, batch.sinks, 0.25, 0)  # fmt: skip
