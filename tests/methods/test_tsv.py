"""TSV-Merge (methods/tsv.py)."""

from __future__ import annotations

import torch

from mergesmith.methods import get_method, merge_tensors
from mergesmith.methods.tsv import polar_factor, tsv_delta


def test_one_task_at_full_rank_is_the_task_vector():
    g = torch.Generator().manual_seed(0)
    base, delta = torch.randn(7, 5, generator=g), torch.randn(7, 5, generator=g)
    torch.testing.assert_close(
        merge_tensors("tsv", [base + delta], base=base), base + delta, atol=1e-5, rtol=1e-5
    )


def test_tasks_in_orthogonal_subspaces_are_summed():
    base = torch.zeros(4, 4)
    a = torch.zeros(4, 4)
    a[0, 0], a[1, 1] = 3.0, 1.0
    b = torch.zeros(4, 4)
    b[2, 3], b[3, 2] = 2.0, 0.5
    out = merge_tensors("tsv", [a, b], base=base)  # k = 4 // 2 = 2 each: nothing is truncated
    torch.testing.assert_close(out, a + b, atol=1e-6, rtol=1e-6)


def test_golden_truncation_and_alpha():
    base = torch.zeros(3, 3)
    a = torch.diag(torch.tensor([3.0, 1.0, 0.5]))
    b = torch.zeros(3, 3)
    b[0, 1] = 2.0  # rank 1, direction e0 e1^T: overlaps a's top left direction e0
    # k = 3 // 2 = 1: a keeps 3 e0 e0^T, b keeps 2 e0 e1^T; U = [e0, e0] has polar factor with
    # columns (e0, e0) / sqrt(2) ... ; compute the reference explicitly
    u = polar_factor(torch.tensor([[1.0, 1.0], [0.0, 0.0], [0.0, 0.0]]))
    vh = polar_factor(torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]))
    expected = 0.5 * (u @ torch.diag(torch.tensor([3.0, 2.0])) @ vh)
    out = merge_tensors("tsv", [a, b], base=base, alpha=0.5)
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-6)


def test_k_parameter_and_orthonormal_factors():
    g = torch.Generator().manual_seed(1)
    deltas = [torch.randn(8, 6, generator=g) for _ in range(3)]
    for k in (1, 2):
        merged = tsv_delta([d.clone() for d in deltas], k)
        assert torch.linalg.matrix_rank(merged) == 3 * k
    u = polar_factor(torch.randn(8, 4, generator=g))
    torch.testing.assert_close(u.T @ u, torch.eye(4), atol=1e-5, rtol=0)


def test_vectors_take_the_mean_task_vector():
    base = torch.tensor([1.0, 1.0])
    out = merge_tensors(
        "tsv", [base + torch.tensor([2.0, 0]), base + torch.tensor([0, 4.0])], base=base, alpha=2.0
    )
    torch.testing.assert_close(out, base + 2.0 * torch.tensor([1.0, 2.0]))


def test_identical_base_returns_the_base():
    x = torch.randn(5, 4)
    torch.testing.assert_close(merge_tensors("tsv", [x.clone(), x.clone()], base=x), x)


def test_needs_whole_matrices():
    assert get_method("tsv").chunkable is False
