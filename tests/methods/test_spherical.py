"""Multi-SLERP and Karcher mean (methods/spherical.py)."""

from __future__ import annotations

import math

import pytest
import torch
from _harness import assert_chunk_invariant

from mergesmith.core.errors import MergeError
from mergesmith.methods import merge_tensors
from mergesmith.methods.nuslerp import slerp_coefficients


def test_multislerp_golden_orthogonal_vectors():
    a, b = torch.tensor([2.0, 0.0]), torch.tensor([0.0, 4.0])
    out = merge_tensors("multislerp", [a, b], weight=[1.0, 3.0])
    # m = 0.25 e1 + 0.75 e2, normalised; norm = 0.25 * 2 + 0.75 * 4 = 3.5
    direction = torch.tensor([0.25, 0.75]) / math.hypot(0.25, 0.75)
    torch.testing.assert_close(out, direction * 3.5)


def test_multislerp_unnormalised_weights_scale_the_norm():
    a, b = torch.tensor([2.0, 0.0]), torch.tensor([0.0, 2.0])
    out = merge_tensors("multislerp", [a, b], weight=[1.0, 1.0], normalize_weights=False)
    torch.testing.assert_close(out, torch.tensor([1.0, 1.0]) / math.sqrt(2) * 4)


def test_multislerp_with_base_works_on_task_vectors():
    base = torch.tensor([1.0, 1.0])
    out = merge_tensors(
        "multislerp",
        [base + torch.tensor([2.0, 0]), base + torch.tensor([0, 2.0])],
        base=base,
        weight=[1.0, 1.0],
    )
    torch.testing.assert_close(out, base + torch.tensor([1.0, 1.0]) * math.sqrt(2))


def test_multislerp_antipodal():
    x = torch.randn(3, 4)
    torch.testing.assert_close(merge_tensors("multislerp", [x, -x], weight=[1.0, 1.0]), torch.zeros(3, 4))
    with pytest.raises(MergeError, match="cancel"):
        merge_tensors("multislerp", [x, -x, x * 0], weight=[1.0, 1.0, 1.0])


def test_karcher_of_identical_tensors_is_that_tensor():
    x = torch.randn(5, 7)
    torch.testing.assert_close(merge_tensors("karcher", [x.clone(), x.clone(), x.clone()]), x)


def test_karcher_of_two_is_the_spherical_midpoint():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(20, generator=g), torch.randn(20, generator=g) * 2
    ua, ub = a / a.norm(), b / b.norm()
    c_a, c_b = slerp_coefficients(0.5, ua.double() @ ub.double(), torch.tensor(1.0), torch.tensor(1.0))
    mid = (float(c_a) * ua + float(c_b) * ub) * (a.norm() + b.norm()) / 2
    torch.testing.assert_close(merge_tensors("karcher", [a, b]), mid)


def test_karcher_converges_to_a_stationary_point():
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(30, generator=g) + 1.0 for _ in range(4)]
    out = merge_tensors("karcher", xs, max_iter=100, tol=1e-12).double()
    u = out / out.norm()
    tangent = torch.zeros(30, dtype=torch.float64)
    for x in xs:
        ui = x.double() / x.double().norm()
        phi = torch.arccos((u @ ui).clamp(-1, 1))
        tangent += phi / torch.sin(phi) * (ui - torch.cos(phi) * u)
    assert float(tangent.norm()) < 1e-5
    torch.testing.assert_close(out.norm(), sum(x.double().norm() for x in xs) / 4)


def test_karcher_weights_pull_towards_the_heavier_model():
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    out = merge_tensors("karcher", [a, b], weight=[3.0, 1.0])
    # weighted Karcher mean of two points: the geodesic point at t = 1/4 from a
    torch.testing.assert_close(out, torch.tensor([math.cos(math.pi / 8), math.sin(math.pi / 8)]))


def test_karcher_zero_tensor_adds_no_direction_but_scales():
    a = torch.tensor([3.0, 4.0])
    out = merge_tensors("karcher", [a, torch.zeros(2)])
    torch.testing.assert_close(out, a / 2)


def test_karcher_antipodal_keeps_the_first_direction():
    a = torch.tensor([1.0, 2.0])
    torch.testing.assert_close(merge_tensors("karcher", [a, -a]), a)


@pytest.mark.parametrize(
    ("method", "with_base"), [("multislerp", False), ("multislerp", True), ("karcher", False)]
)
def test_chunked_equals_whole(method, with_base):
    g = torch.Generator().manual_seed(2)
    base = torch.randn(9, 5, generator=g) if with_base else None
    models = [torch.randn(9, 5, generator=g) + 0.3 * i for i in range(3)]
    if with_base:
        models = [m + base for m in models]
    params = {"weight": [0.2, 0.5, 1.3]} if method == "multislerp" else {}
    assert_chunk_invariant(method, models, base, **params)
