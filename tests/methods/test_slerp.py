import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mergesmith.methods import merge_tensors
from mergesmith.methods.slerp import slerp, slerp_coefficients


def test_golden_quarter_circle():
    v0 = torch.tensor([1.0, 0.0])
    v1 = torch.tensor([0.0, 1.0])
    out = slerp(v0, v1, 0.5)
    assert torch.allclose(out, torch.tensor([math.sqrt(0.5), math.sqrt(0.5)]), atol=1e-7)
    out = slerp(v0, v1, 1 / 3)  # 30 degrees along the arc
    assert torch.allclose(out, torch.tensor([math.cos(math.pi / 6), math.sin(math.pi / 6)]), atol=1e-6)


def test_unnormalised_inputs_scale_the_coefficients_not_the_angle():
    v0 = torch.tensor([2.0, 0.0])
    v1 = torch.tensor([0.0, 4.0])
    c0, c1 = slerp_coefficients(0.5, 0.0, 2.0, 4.0)
    assert math.isclose(c0, math.sqrt(0.5)) and math.isclose(c1, math.sqrt(0.5))
    assert torch.allclose(
        slerp(v0, v1, 0.5), torch.tensor([2 * math.sqrt(0.5), 4 * math.sqrt(0.5)]), atol=1e-6
    )


def test_near_parallel_falls_back_to_linear_interpolation():
    v0 = torch.tensor([1.0, 0.0, 0.0])
    v1 = torch.tensor([2.0, 0.01, 0.0])  # cos ~ 0.99999
    out = slerp(v0, v1, 0.25)
    assert torch.allclose(out, 0.75 * v0 + 0.25 * v1)
    anti = slerp(v0, -v0, 0.5)  # antiparallel also interpolates linearly
    assert torch.allclose(anti, torch.zeros(3))


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 10_000))
def test_endpoints(seed):
    g = torch.Generator().manual_seed(seed)
    a, b = torch.randn(4, 6, generator=g), torch.randn(4, 6, generator=g)
    assert torch.allclose(merge_tensors("slerp", [b], base=a, t=0.0), a, atol=1e-6)
    assert torch.allclose(merge_tensors("slerp", [b], base=a, t=1.0), b, atol=1e-5)


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 10_000), st.floats(0.0, 1.0))
def test_unit_vectors_stay_on_the_sphere(seed, t):
    g = torch.Generator().manual_seed(seed)
    a, b = torch.randn(50, generator=g), torch.randn(50, generator=g)
    a, b = a / a.norm(), b / b.norm()
    assert abs(float(slerp(a, b, t).norm()) - 1.0) < 1e-5


def test_identical_inputs_give_the_input():
    x = torch.randn(3, 3)
    assert torch.allclose(slerp(x, x.clone(), 0.3), x, atol=1e-6)
