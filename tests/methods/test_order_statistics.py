"""OrderStatistics, band_counts, MagnitudeBand and rank_keep_probability (methods/sparsify.py additions)."""

from __future__ import annotations

import pytest
import torch

from mergesmith.methods.sparsify import (
    SMALL,
    ExactTop,
    MagnitudeBand,
    OrderStatistics,
    band_counts,
    rank_keep_probability,
)


def _run(stats, x: torch.Tensor, chunks: int = 1) -> None:
    parts = x.chunk(chunks)
    for p in range(2):
        for part in parts:
            stats.observe(p, part)
        stats.end(p)


@pytest.mark.parametrize("chunks", [1, 4])
def test_order_statistics_are_exact(chunks):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1000, generator=g)
    ranks = [1, 2, 17, 500, 999, 1000]
    stats = OrderStatistics(ranks)
    _run(stats, x, chunks)
    expected = x.abs().sort(descending=True).values
    assert [stats.value(i) for i in range(len(ranks))] == [float(expected[k - 1]) for k in ranks]


def test_order_statistics_histogram_path_with_ties():
    g = torch.Generator().manual_seed(1)
    x = torch.randint(-50, 50, (SMALL + 1000,), generator=g).float() / 8  # many repeated magnitudes
    ranks = [1, 1000, SMALL]
    stats = OrderStatistics(ranks)
    _run(stats, x, chunks=3)
    ordered = x.abs().sort(descending=True).values
    for i, k in enumerate(ranks):
        assert stats.value(i) == float(ordered[k - 1])
        assert stats.ties_in_top(i) == k - int((ordered > ordered[k - 1]).sum())
        assert stats.ties(i) == int((ordered == ordered[k - 1]).sum())


@pytest.mark.parametrize("n", [500, SMALL + 500])
@pytest.mark.parametrize("chunks", [1, 7])
def test_exact_top_breaks_ties_like_a_stable_sort(n, chunks):
    g = torch.Generator().manual_seed(2)
    x = torch.randint(0, 20, (n,), generator=g).float()
    k = n // 3
    stats = OrderStatistics([k])
    _run(stats, x, chunks)
    top = ExactTop(stats, 0)
    parts, start = [], 0
    for part in x.chunk(chunks):
        parts.append(top.mask(part, start))
        start += part.numel()
    mask = torch.cat(parts)
    assert int(mask.sum()) == k
    threshold = float(x.sort(descending=True).values[k - 1])
    assert bool((x[mask] >= threshold).all()) and bool((x[~mask] <= threshold).all())
    stable = x.argsort(stable=True, descending=False).flip(0)[:k]  # later ties rank higher
    expected = torch.zeros(n, dtype=torch.bool)
    expected[stable] = True
    assert torch.equal(mask, expected)


def test_exact_top_needs_chunks_in_order():
    stats = OrderStatistics([2])
    _run(stats, torch.ones(10))
    with pytest.raises(RuntimeError):
        ExactTop(stats, 0).mask(torch.ones(5), 5)


def test_order_statistics_reject_bad_ranks():
    with pytest.raises(ValueError):
        OrderStatistics([0])
    stats = OrderStatistics([5])
    stats.observe_hi(torch.ones(3))
    with pytest.raises(ValueError):
        stats.end_hi()


@pytest.mark.parametrize(
    ("density", "gamma", "n", "expected"),
    [
        (0.5, 0.1, 20, (2, 10)),  # drop the top 2 and the bottom 8
        (0.9, 0.01, 20, (0, 18)),  # int(0.2) = 0 outliers: nothing zeroed wholesale (mergekit < 0.1.5 bug)
        (0.5, 0.6, 20, (10, 10)),  # gamma >= 1 - density: the top shrinks to 1 - density, no bottom
        (1.0, 0.01, 20, (0, 20)),
        (0.01, 0.0, 20, (0, 1)),  # at least one entry kept, as keep_count does
        (0.0, 0.1, 20, (2, 0)),
    ],
)
def test_band_counts(density, gamma, n, expected):
    assert band_counts(density, gamma, n) == expected


def test_magnitude_band_keeps_the_middle():
    x = torch.tensor([5.0, -6, -14, -20, -8, 15, -4, 7, -10, -18, -12, 3, 17, 19, 11, 13, -16, 9, -2, 1])
    band = MagnitudeBand(x.numel(), *band_counts(0.5, 0.1, x.numel()))
    _run(band, x)
    kept = sorted(x[band.mask(x, 0)].abs().tolist())
    assert kept == [9.0, 10, 11, 12, 13, 14, 15, 16, 17, 18]


def test_rank_keep_probability_rows():
    x = torch.tensor([[3.0, -1.0, 0.5, 2.0, -4.0], [1.0, 1.0, 1.0, 1.0, 1.0]])
    p = rank_keep_probability(x, 0.5, 0.2)
    # ranks by |x|: row 0 -> [3, 1, 0, 2, 4]; row 1 ties in index order -> [0, 1, 2, 3, 4]
    torch.testing.assert_close(p[0], torch.tensor([0.6, 0.4, 0.3, 0.5, 0.7]))
    torch.testing.assert_close(p[1], torch.tensor([0.3, 0.4, 0.5, 0.6, 0.7]))


def test_rank_keep_probability_single_entry_rows_and_zero_epsilon():
    assert rank_keep_probability(torch.ones(4, 1), 0.4, 0.2).eq(0.4).all()
    assert rank_keep_probability(torch.randn(3, 5), 0.4, 0.0).eq(0.4).all()
