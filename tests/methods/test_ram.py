"""RAM (methods/ram.py)."""

from __future__ import annotations

import torch
from _harness import assert_chunk_invariant

from mergesmith.methods import merge_tensors


def test_golden_unique_shared_and_unchanged():
    base = torch.zeros(6)
    a = torch.tensor([0.5, 0.5, -0.5, 0.0, 1e-6, 0.25])
    b = torch.tensor([0.5, -0.5, 0.0, 0.0, 0.0, 0.25])
    out = merge_tensors("ram", [a, b], base=base, epsilon=0.25)
    # |delta| > 0.25 is active: [both, both, a, none, none, none]
    torch.testing.assert_close(out, torch.tensor([0.5, 0.0, -0.5, 0.0, 0.0, 0.0]))
    out = merge_tensors("ram", [a, b], base=base)  # epsilon 1e-5
    torch.testing.assert_close(out, torch.tensor([0.5, 0.0, -0.5, 0.0, 0.0, 0.25]))


def test_unique_changes_are_not_diluted():
    base = torch.ones(4)
    a = base + torch.tensor([1.0, 0.0, 0.0, 0.0])
    b = base + torch.tensor([0.0, 2.0, 0.0, 0.0])
    torch.testing.assert_close(merge_tensors("ram", [a, b], base=base), torch.tensor([2.0, 3.0, 1.0, 1.0]))


def test_identical_inputs_return_the_input():
    x = torch.randn(3, 3)
    torch.testing.assert_close(merge_tensors("ram", [x.clone(), x.clone()], base=x), x)


def test_chunked_equals_whole():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(8, 3, generator=g)
    models = [base + torch.randn(8, 3, generator=g) * (torch.rand(8, 3, generator=g) > 0.5) for _ in range(3)]
    assert_chunk_invariant("ram", models, base)
