"""Arcee Fusion (methods/arcee_fusion.py)."""

from __future__ import annotations

import math

import torch
from _harness import assert_chunk_invariant

from mergesmith.methods import merge_tensors
from mergesmith.methods.arcee_fusion import importance, lower_quantile_ranks


def test_importance_is_change_times_row_kl():
    base = torch.tensor([[0.0, 0.0], [1.0, 2.0]])
    tuned = torch.tensor([[math.log(3.0), 0.0], [1.0, 2.0]])
    p = torch.tensor([0.75, 0.25])  # softmax of row 0 of tuned; the base row is uniform
    kl = float((p * (p / 0.5).log()).sum())
    torch.testing.assert_close(importance(base, tuned), torch.tensor([[math.log(3.0) * kl, 0.0], [0.0, 0.0]]))


def test_quantile_ranks_are_torch_lower_interpolation():
    x = torch.randn(37)
    values = x.abs().sort(descending=True).values
    for rank, q in zip(lower_quantile_ranks(37), (0.25, 0.5, 0.75)):
        assert values[rank - 1] == torch.quantile(x.abs(), q, interpolation="lower")


def test_golden_only_outliers_are_taken():
    base = torch.zeros(8, 4)
    tuned = 0.01 * torch.arange(1.0, 33.0).reshape(8, 4) / 32  # small changes everywhere
    tuned[3, 0] = 4.0  # one salient change
    out = merge_tensors("arcee_fusion", [tuned], base=base)
    expected = base.clone()
    expected[3] = tuned[3]  # the row's large KL makes its other (small) changes salient too
    torch.testing.assert_close(out, expected)


def test_matches_the_quantile_formula():
    g = torch.Generator().manual_seed(3)
    base = torch.randn(10, 7, generator=g)
    tuned = base + torch.randn(10, 7, generator=g) * torch.rand(10, 1, generator=g)
    imp = importance(base, tuned).reshape(-1)
    q25, q50, q75 = (torch.quantile(imp, q, interpolation="lower") for q in (0.25, 0.5, 0.75))
    keep = (importance(base, tuned) >= q50 + 1.5 * (q75 - q25)).float()
    out = merge_tensors("arcee_fusion", [tuned], base=base)
    torch.testing.assert_close(out, base + (tuned - base) * keep)
    assert 0 < keep.sum() < keep.numel()


def test_identical_inputs_return_the_input():
    x = torch.randn(6, 5)
    torch.testing.assert_close(merge_tensors("arcee_fusion", [x.clone()], base=x), x)


def test_chunked_equals_whole():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(16, 12, generator=g)
    tuned = base + torch.randn(16, 12, generator=g) * torch.rand(16, 1, generator=g) * 2
    assert_chunk_invariant("arcee_fusion", [tuned], base, rows=5)
