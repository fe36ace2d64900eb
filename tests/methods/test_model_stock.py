"""Model Stock (methods/model_stock.py)."""

from __future__ import annotations

import math

import pytest
import torch
from _harness import assert_chunk_invariant

from mergesmith.methods import merge_tensors


def test_cosine_one_gives_the_mean_of_the_finetunes():
    base = torch.randn(4, 6)
    d = torch.randn(4, 6)
    models = [base + d, base + 3 * d]
    out = merge_tensors("model_stock", models, base=base)
    torch.testing.assert_close(out, (models[0] + models[1]) / 2)


def test_cosine_zero_gives_the_base():
    base = torch.randn(2, 2)
    models = [base + torch.tensor([[1.0, 0], [0, 0]]), base + torch.tensor([[0.0, 2], [0, 0]])]
    torch.testing.assert_close(merge_tensors("model_stock", models, base=base), base)


def test_golden_two_models_at_sixty_degrees():
    base = torch.zeros(2)
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([0.5, math.sqrt(3) / 2])  # cos = 0.5
    t = 2 * 0.5 / (1 + 0.5)  # 2/3
    out = merge_tensors("model_stock", [a, b], base=base)
    torch.testing.assert_close(out, t * (a + b) / 2)


def test_three_models_use_the_mean_pairwise_cosine():
    base = torch.zeros(3)
    e = torch.eye(3)
    models = [e[0], e[0], e[1]]  # cosines 1, 0, 0 -> mean 1/3
    t = 3 * (1 / 3) / (1 + 2 * (1 / 3))
    out = merge_tensors("model_stock", models, base=base)
    torch.testing.assert_close(out, t * (2 * e[0] + e[1]) / 3)


def test_filter_wise_uses_one_ratio_per_row():
    base = torch.zeros(2, 2)
    a = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    b = torch.tensor([[2.0, 0.0], [0.0, 1.0]])  # row 0 parallel (t = 1), row 1 orthogonal (t = 0)
    out = merge_tensors("model_stock", [a, b], base=base, filter_wise=True)
    torch.testing.assert_close(out, torch.tensor([[1.5, 0.0], [0.0, 0.0]]))


def test_weights_make_a_weighted_mean():
    base = torch.zeros(3)
    d = torch.tensor([1.0, 2.0, 3.0])
    out = merge_tensors("model_stock", [base + d, base + 2 * d], base=base, weight=[3.0, 1.0])
    torch.testing.assert_close(out, (3 * d + 2 * d) / 4)


def test_zero_task_vector_counts_as_orthogonal():
    base = torch.randn(3, 3)
    out = merge_tensors("model_stock", [base.clone(), base + 1.0], base=base)
    torch.testing.assert_close(out, base)


def test_identical_inputs_return_the_input():
    x = torch.randn(4, 4)
    torch.testing.assert_close(merge_tensors("model_stock", [x.clone(), x.clone()], base=x), x)


@pytest.mark.parametrize("filter_wise", [False, True])
def test_chunked_equals_whole(filter_wise):
    g = torch.Generator().manual_seed(0)
    base = torch.randn(10, 6, generator=g)
    models = [base + torch.randn(10, 6, generator=g) + 0.5 for _ in range(3)]
    assert_chunk_invariant("model_stock", models, base, filter_wise=filter_wise)
