"""NearSwap (methods/nearswap.py)."""

from __future__ import annotations

import torch
from _harness import assert_chunk_invariant

from mergesmith.methods import merge_tensors


def test_golden():
    base = torch.zeros(6)
    other = torch.tensor([0.0, 1e-7, 0.05, 0.1, 0.5, -2.0])
    out = merge_tensors("nearswap", [other], base=base, t=0.1)
    # within t: take the other value; farther: move exactly t towards it
    torch.testing.assert_close(out, torch.tensor([0.0, 1e-7, 0.05, 0.1, 0.1, -0.1]))


def test_tiny_differences_use_the_distance_floor():
    out = merge_tensors("nearswap", [torch.tensor([1e-7])], base=torch.zeros(1), t=5e-7)
    torch.testing.assert_close(out, torch.tensor([5e-8]))  # w = t / max(|d|, 1e-6) = 0.5


def test_t_zero_and_large_t():
    base, other = torch.randn(4, 4), torch.randn(4, 4)
    torch.testing.assert_close(merge_tensors("nearswap", [other], base=base, t=0.0), base)
    torch.testing.assert_close(merge_tensors("nearswap", [other], base=base, t=1e6), other)


def test_chunked_equals_whole():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(7, 4, generator=g)
    assert_chunk_invariant("nearswap", [base + torch.randn(7, 4, generator=g)], base, t=0.5)
