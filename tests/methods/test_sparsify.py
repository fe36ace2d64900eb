import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mergesmith.methods.sparsify import TopKThreshold, keep_count


def magnitude_mask(x: torch.Tensor, density: float) -> torch.Tensor:
    """Keep mask of the top ``density`` fraction of |x| (whole tensor in memory); zeros never kept: the
    TIES selection (TopKThreshold.find_in and trim) on one in-memory tensor."""
    k = keep_count(density, x.numel())
    xf = x.float().contiguous()
    if k >= x.numel():
        return xf != 0
    if k == 0:
        return torch.zeros_like(x, dtype=torch.bool)
    sel = TopKThreshold(k)
    sel.find_in(xf)
    return sel.trim(xf) != 0


def test_golden_mask():
    x = torch.tensor([0.1, -5.0, 3.0, -0.2, 0.0, 2.0])
    assert magnitude_mask(x, 0.5).tolist() == [False, True, True, False, False, True]


def test_keep_count_rules():
    assert keep_count(1.0, 10) == 10 and keep_count(1.5, 10) == 10
    assert keep_count(0.0, 10) == 0 and keep_count(-1.0, 10) == 0
    assert keep_count(0.01, 10) == 1  # at least one element survives a positive density
    assert keep_count(0.37, 100) == 37


@settings(max_examples=50, deadline=None)
@given(st.integers(0, 100_000), st.integers(1, 400), st.floats(0.001, 0.999))
def test_mask_keeps_exactly_the_k_largest(seed, n, density):
    x = torch.randn(n, generator=torch.Generator().manual_seed(seed))
    m = magnitude_mask(x, density)
    k = keep_count(density, n)
    assert int(m.sum()) == k  # continuous values: no ties
    if 0 < k < n:
        assert x.abs()[m].min() > x.abs()[~m].max()


def test_chunked_threshold_equals_whole():
    x = torch.randn(1000, 17)
    whole = TopKThreshold(5000)
    chunked = TopKThreshold(5000)
    whole.observe_hi(x)
    for c in x.split(123):
        chunked.observe_hi(c)
    whole.end_hi()
    chunked.end_hi()
    whole.observe_lo(x)
    for c in x.split(123):
        chunked.observe_lo(c)
    whole.end_lo()
    chunked.end_lo()
    assert whole.threshold == chunked.threshold
    assert whole.threshold == float(x.abs().reshape(-1).sort(descending=True).values[4999])


def test_extreme_magnitudes():
    x = torch.tensor([float("1e-40"), 1e30, -1e-30, 3.0])  # subnormal, huge, tiny
    assert magnitude_mask(x, 0.5).tolist() == [False, True, False, True]


def test_ties_at_the_threshold_keep_exactly_k_last_in_order():
    x = torch.tensor([1.0, 2.0, -2.0, 0.5, 2.0, 3.0, -2.0, 2.0])
    # k = 4: 3.0 plus the last three of the five 2.0-magnitudes (a stable sort ranks later ties higher)
    assert magnitude_mask(x, 0.5).tolist() == [False, False, False, False, True, True, True, True]


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 100_000), st.integers(1, 300), st.floats(0.01, 0.99), st.integers(1, 40))
def test_exact_count_with_many_ties_whole_and_chunked(seed, n, density, rows):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(-4, 5, (n,), generator=g).float()  # few distinct magnitudes: ties everywhere
    k = keep_count(density, n)
    m = magnitude_mask(x, density)
    kept = int((m & (x != 0)).sum())
    assert kept == min(k, int((x != 0).sum()))
    sel = TopKThreshold(k)
    chunks = list(x.split(rows))
    for c in chunks:
        sel.observe_hi(c)
    sel.end_hi()
    for c in chunks:
        sel.observe_lo(c)
    sel.end_lo()
    chunked = torch.cat([sel.trim(c) for c in chunks])
    assert torch.equal(chunked, torch.where(m, x, torch.zeros_like(x)))


@settings(max_examples=8, deadline=None)
@given(st.integers(0, 100_000), st.floats(0.05, 0.95), st.integers(1, 5))
def test_histogram_path_with_ties_across_blocks_keeps_the_last_ties(seed, density, n_chunks):
    """Past SMALL values the threshold comes from the two histograms and the trim zeroes ties block by
    block: the kept entries are exactly the k largest, ties ranked by position (a stable sort's order),
    whole or in chunks of any size."""
    g = torch.Generator().manual_seed(seed)
    n = 70_000 + int(torch.randint(0, 9000, (1,), generator=g))
    x = torch.randint(-6, 7, (n,), generator=g).float() * 0.25  # a few magnitudes: long runs of ties
    k = keep_count(density, n)
    order = torch.sort(x.abs(), stable=True).indices  # ascending; later ties rank higher
    expected = torch.zeros(n, dtype=torch.bool)
    expected[order[n - k :]] = True
    expected &= x != 0  # a kept zero is still 0
    assert torch.equal(magnitude_mask(x, density), expected)
    sel = TopKThreshold(k)
    chunks = list(x.tensor_split(n_chunks))
    for c in chunks:
        sel.observe_hi(c.numpy())
    sel.end_hi()
    for c in chunks:
        sel.observe_lo(c.numpy())
    sel.end_lo()
    trimmed = np.concatenate([sel.trim(c.numpy()) for c in chunks])
    assert np.array_equal(trimmed != 0, expected.numpy())
