"""NuSLERP (methods/nuslerp.py)."""

from __future__ import annotations

import math

import pytest
import torch
from _harness import assert_chunk_invariant

from mergesmith.methods import merge_tensors
from mergesmith.methods.nuslerp import interpolation_factor


def _slerp(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    omega = math.acos(float(a @ b / (a.norm() * b.norm())))
    return (math.sin((1 - t) * omega) * a + math.sin(t * omega) * b) / math.sin(omega)


def test_interpolation_factor():
    assert interpolation_factor(1.0, 3.0) == 0.75
    assert interpolation_factor(0.5, -0.5) == 0.5
    assert interpolation_factor(0.0, 0.0) == 0.5


def test_golden_quarter_turn():
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    out = merge_tensors("nuslerp", [a, b], weight=[1.0, 1.0])
    torch.testing.assert_close(out, torch.tensor([1.0, 1.0]) / math.sqrt(2))
    out = merge_tensors("nuslerp", [a, b], weight=[2.0, 1.0])  # t = 1/3: 30 degrees from a
    torch.testing.assert_close(out, torch.tensor([math.cos(math.pi / 6), math.sin(math.pi / 6)]))


def test_endpoints():
    a, b = torch.randn(3, 4), torch.randn(3, 4)
    torch.testing.assert_close(merge_tensors("nuslerp", [a, b], weight=[1.0, 0.0]), a)
    torch.testing.assert_close(merge_tensors("nuslerp", [a, b], weight=[0.0, 1.0]), b)


def test_rows_and_columns():
    a, b = torch.randn(3, 5), torch.randn(3, 5)
    rows = merge_tensors("nuslerp", [a, b], weight=[1.0, 2.0], nuslerp_flatten=False)
    for i in range(3):
        torch.testing.assert_close(rows[i], _slerp(a[i], b[i], 2 / 3))
    cols = merge_tensors("nuslerp", [a, b], weight=[1.0, 2.0], nuslerp_flatten=False, nuslerp_row_wise=True)
    for j in range(5):
        torch.testing.assert_close(cols[:, j], _slerp(a[:, j], b[:, j], 2 / 3))


def test_flattened():
    a, b = torch.randn(3, 5), torch.randn(3, 5)
    out = merge_tensors("nuslerp", [a, b], weight=[1.0, 1.0])
    torch.testing.assert_close(out.reshape(-1), _slerp(a.reshape(-1), b.reshape(-1), 0.5))


def test_base_interpolates_task_vectors():
    base, a, b = torch.randn(4, 3), torch.randn(4, 3), torch.randn(4, 3)
    out = merge_tensors("nuslerp", [base + a, base + b], base=base, weight=[1.0, 3.0])
    torch.testing.assert_close(out, base + merge_tensors("nuslerp", [a, b], weight=[1.0, 3.0]))


def test_parallel_and_zero_rows_fall_back_sensibly():
    a = torch.tensor([[1.0, 2.0], [0.0, 0.0], [1.0, 1.0]])
    b = torch.tensor([[2.0, 4.0], [0.0, 0.0], [-1.0, -1.0]])
    out = merge_tensors("nuslerp", [a, b], weight=[1.0, 1.0], nuslerp_flatten=False)
    torch.testing.assert_close(out, torch.tensor([[1.5, 3.0], [0.0, 0.0], [0.0, 0.0]]))


def test_identical_inputs_return_the_input():
    x = torch.randn(4, 6)
    for flatten, row_wise in [(True, False), (False, False), (False, True)]:
        out = merge_tensors(
            "nuslerp",
            [x.clone(), x.clone()],
            weight=[0.3, 0.7],
            nuslerp_flatten=flatten,
            nuslerp_row_wise=row_wise,
        )
        torch.testing.assert_close(out, x)


@pytest.mark.parametrize(("flatten", "row_wise"), [(True, False), (False, False), (False, True)])
@pytest.mark.parametrize("with_base", [False, True])
def test_chunked_equals_whole(flatten, row_wise, with_base):
    g = torch.Generator().manual_seed(0)
    base = torch.randn(10, 4, generator=g) if with_base else None
    models = [torch.randn(10, 4, generator=g) for _ in range(2)]
    if with_base:
        models = [m + base for m in models]
    assert_chunk_invariant(
        "nuslerp", models, base, weight=[0.4, 0.9], nuslerp_flatten=flatten, nuslerp_row_wise=row_wise
    )
