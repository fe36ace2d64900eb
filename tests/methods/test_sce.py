"""SCE: select, calculate, erase (methods/sce.py)."""

from __future__ import annotations

import pytest
import torch
from _harness import assert_chunk_invariant

from mergesmith.methods import merge_tensors


def test_golden_without_selection():
    base = torch.zeros(4)
    a = torch.tensor([1.0, -1.0, 2.0, 0.0])  # mean square 6/4
    b = torch.tensor([-3.0, 1.0, 0.0, 0.0])  # mean square 10/4
    c_a, c_b = 6 / 16, 10 / 16
    out = merge_tensors("sce", [a, b], base=base)
    # signs of a + b: [-, +(0), +, +(0)]: entry 0 keeps b only, entry 1 b only, entry 2 a only, entry 3 nobody
    expected = torch.tensor([-3.0, 1.0, 2.0, 0.0])
    torch.testing.assert_close(out, expected)
    # the coefficients matter where two models agree
    a2, b2 = torch.tensor([1.0, 1.0]), torch.tensor([3.0, -1.0])
    out = merge_tensors("sce", [a2, b2], base=torch.zeros(2))
    ca, cb = 1.0 / 6.0, 5.0 / 6.0  # mean squares 1 and 5
    torch.testing.assert_close(out, torch.tensor([(ca * 1 + cb * 3) / (ca + cb), 1.0]))
    del c_a, c_b


def test_select_topk_keeps_the_highest_variance_positions():
    base = torch.zeros(6)
    a = torch.tensor([1.0, 1.0, 5.0, 0.0, 2.0, -4.0])
    b = torch.tensor([1.0, 2.0, -5.0, 0.0, 2.5, 4.0])
    # variances (population): [0, .25, 25, 0, .0625, 16]; top int(0.5 * 6) = 3: positions 2, 5, 1
    out = merge_tensors("sce", [a, b], base=base, select_topk=0.5)
    assert ((out != 0) == torch.tensor([False, True, True, False, False, True])).all()


def test_weights_scale_the_coefficients():
    base = torch.zeros(2)
    a, b = torch.tensor([1.0, 1.0]), torch.tensor([3.0, 3.0])
    plain = merge_tensors("sce", [a, b], base=base)
    weighted = merge_tensors("sce", [a, b], base=base, weight=[9.0, 1.0])
    torch.testing.assert_close(plain, torch.full((2,), (1 * 1 + 9 * 3) / 10))
    torch.testing.assert_close(weighted, torch.full((2,), (9 * 1 * 1 + 9 * 3) / 18))


def test_identical_inputs_return_the_input():
    x = torch.randn(5, 3)
    torch.testing.assert_close(merge_tensors("sce", [x.clone(), x.clone()], base=x, select_topk=0.5), x)


@pytest.mark.parametrize("select_topk", [1.0, 0.3])
def test_chunked_equals_whole(select_topk):
    g = torch.Generator().manual_seed(0)
    base = torch.randn(12, 5, generator=g)
    models = [base + torch.randn(12, 5, generator=g) * s for s in (0.5, 1.0, 2.0)]
    assert_chunk_invariant("sce", models, base, select_topk=select_topk)
