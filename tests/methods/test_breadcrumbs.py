"""Model Breadcrumbs: breadcrumbs and breadcrumbs_ties (methods/breadcrumbs.py)."""

from __future__ import annotations

import pytest
import torch
from _harness import assert_chunk_invariant, run_chunked

from mergesmith.methods import merge_tensors


def test_golden_band_and_weighted_sum():
    base = torch.zeros(10)
    a = torch.tensor([1.0, -2, 3, -4, 5, -6, 7, -8, 9, -10])  # |a| ranks: 10 largest ... 1 smallest
    b = torch.tensor([0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 2.0])
    # a: density 0.5, gamma 0.1 -> drop the top 1 (-10) and the bottom 4 (1..4), keep 5..9
    # b: density 0.1, gamma 0 -> keep only the largest (2.0)
    out = merge_tensors(
        "breadcrumbs", [a, b], base=base, weight=[1.0, 0.5], density=[0.5, 0.1], gamma=[0.1, 0.0]
    )
    expected = torch.tensor([0.0, 0, 0, 0, 5, -6, 7, -8, 9, 0 + 0.5 * 2.0])
    torch.testing.assert_close(out, expected)


def test_exact_counts_and_which_entries():
    g = torch.Generator().manual_seed(0)
    for n, density, gamma in [(1000, 0.7, 0.05), (333, 0.25, 0.3), (50, 0.9, 0.01), (7, 0.5, 0.2)]:
        delta = torch.randn(n, generator=g)
        base = torch.randn(n, generator=g)
        out = merge_tensors(
            "breadcrumbs", [base + delta], base=base, weight=[1.0], density=[density], gamma=[gamma]
        )
        kept = (out - base).abs() > 0
        top = min(int(gamma * n), n - max(1, int(density * n)))
        order = delta.abs().argsort(descending=True)
        expected = torch.zeros(n, dtype=torch.bool)
        expected[order[top : top + max(1, int(density * n))]] = True
        assert torch.equal(kept, expected), (n, density, gamma)


@pytest.mark.parametrize("rows", [1, 7, 40])
def test_exact_counts_with_repeated_magnitudes(rows):
    """bf16-like task vectors repeat magnitudes; the band still keeps exactly int(density * n) entries."""
    g = torch.Generator().manual_seed(3)
    base = torch.zeros(40, 25)
    delta = torch.randint(-6, 7, (40, 25), generator=g).float() / 4
    out = run_chunked(
        "breadcrumbs", [base + delta], base, rows=rows, weight=[1.0], density=[0.5], gamma=[0.1]
    )
    kept = out != 0
    nonzero = int((delta != 0).sum())
    assert int(kept.sum()) == min(500, nonzero)  # zeros "kept" are still zeros
    torch.testing.assert_close(
        out, merge_tensors("breadcrumbs", [delta], base=base, weight=[1.0], density=[0.5], gamma=[0.1])
    )


def test_ties_at_the_edges_rank_like_a_stable_sort():
    """Of equal magnitudes the later entry counts as larger (what mergekit's sort does on small tensors)."""
    delta = torch.tensor([[3.0, 1, 2, 1, 2, 3, 1, 2, 3, 1, 2, 3, 2, 1, 3, 2]])
    out = merge_tensors(
        "breadcrumbs", [delta], base=torch.zeros_like(delta), weight=[1.0], density=[0.5], gamma=[0.125]
    )
    # the two outliers dropped are the last 3s; of the 2s at the lower edge the first one goes
    kept = [[1, 0, 0, 0, 1, 1, 0, 1, 1, 0, 1, 0, 1, 0, 0, 1]]
    assert (out != 0).int().tolist() == kept


def test_small_tensors_are_not_zeroed():
    """mergekit before 0.1.5 zeroed every tensor with fewer than 1/gamma entries (a slicing bug)."""
    base = torch.zeros(8)
    delta = torch.arange(1.0, 9.0)
    out = merge_tensors("breadcrumbs", [delta], base=base, weight=[1.0], density=[0.9], gamma=[0.01])
    # int(0.01 * 8) = 0 outliers and int(0.9 * 8) = 7 kept: only the smallest entry goes
    torch.testing.assert_close(out, torch.tensor([0.0, 2, 3, 4, 5, 6, 7, 8]))


def test_default_density_keeps_everything():
    base, model = torch.randn(5, 4), torch.randn(5, 4)
    out = merge_tensors("breadcrumbs", [model], base=base, weight=[1.0])
    torch.testing.assert_close(out, model)


def test_rescale_restores_the_l1_norm():
    g = torch.Generator().manual_seed(1)
    base, delta = torch.randn(40, generator=g), torch.randn(40, generator=g)
    out = merge_tensors(
        "breadcrumbs", [base + delta], base=base, weight=[1.0], density=[0.5], gamma=[0.1], rescale=True
    )
    torch.testing.assert_close((out - base).abs().sum(), delta.abs().sum())
    assert int(((out - base) != 0).sum()) == 20


def test_breadcrumbs_ties_elects_signs():
    base = torch.zeros(4)
    a = torch.tensor([1.0, -3.0, 2.0, 1.0])
    b = torch.tensor([-2.0, 1.0, 2.0, 1.0])
    out = merge_tensors("breadcrumbs_ties", [a, b], base=base, weight=[1.0, 1.0], gamma=[0.0, 0.0])
    # signs of a + b: [-, -, +, +]; agreeing entries summed (normalize is false by default)
    torch.testing.assert_close(out, torch.tensor([-2.0, -3.0, 4.0, 2.0]))
    normalized = merge_tensors(
        "breadcrumbs_ties", [a, b], base=base, weight=[1.0, 1.0], gamma=[0.0, 0.0], normalize=True
    )
    torch.testing.assert_close(normalized, torch.tensor([-2.0, -3.0, 2.0, 1.0]))


@pytest.mark.parametrize("method", ["breadcrumbs", "breadcrumbs_ties"])
def test_identical_inputs_return_the_input(method):
    x = torch.randn(6, 5)
    out = merge_tensors(method, [x.clone(), x.clone()], base=x, weight=[0.5, 0.5], density=[0.6, 0.6])
    torch.testing.assert_close(out, x)


@pytest.mark.parametrize("method", ["breadcrumbs", "breadcrumbs_ties"])
@pytest.mark.parametrize("rescale", [False, True])
def test_chunked_equals_whole(method, rescale):
    g = torch.Generator().manual_seed(2)
    base = torch.randn(11, 7, generator=g)
    models = [base + torch.randn(11, 7, generator=g) for _ in range(2)]
    assert_chunk_invariant(
        method, models, base, weight=[0.7, 0.4], density=[0.6, 0.3], gamma=[0.05, 0.2], rescale=rescale
    )
