"""DELLA: della and della_linear (methods/della.py)."""

from __future__ import annotations

import pytest
import torch
from _harness import assert_chunk_invariant

from mergesmith.core.errors import MergeError
from mergesmith.methods import merge_tensors


def _pair(rows: int = 200, cols: int = 50, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(rows, cols, generator=g)
    return base, base + torch.randn(rows, cols, generator=g)


@pytest.mark.parametrize(("density", "epsilon"), [(0.5, 0.5), (0.9, 0.1), (0.1, 0.2), (0.0, 0.0)])
def test_probabilities_outside_the_open_interval_are_an_error(density, epsilon):
    base, model = _pair(4, 4)
    with pytest.raises(MergeError, match=r"strictly between 0 and 1|must be in \(0, 1\]"):
        merge_tensors("della", [model], base=base, weight=[1.0], density=[density], epsilon=[epsilon])


def test_density_one_keeps_everything_whatever_epsilon():
    base, model = _pair(4, 4)
    out = merge_tensors("della_linear", [model], base=base, weight=[1.0], density=[1.0], epsilon=[0.15])
    torch.testing.assert_close(out, model)


def test_epsilon_zero_is_dare():
    base, model = _pair()
    other = model + 0.1
    kw = dict(weight=[0.6, 0.4], density=[0.3, 0.6], seed=5)
    della = merge_tensors("della_linear", [model, other], base=base, epsilon=[0.0, 0.0], **kw)
    dare = merge_tensors("dare_linear", [model, other], base=base, **kw)
    torch.testing.assert_close(della, dare)
    della_t = merge_tensors("della", [model, other], base=base, epsilon=[0.0, 0.0], normalize=False, **kw)
    dare_t = merge_tensors("dare_ties", [model, other], base=base, **kw)
    torch.testing.assert_close(della_t, dare_t)


def test_keep_frequency_follows_the_magnitude_rank():
    base, model = _pair(4000, 5, seed=1)
    out = merge_tensors(
        "della_linear", [model], base=base, weight=[1.0], density=[0.5], epsilon=[0.2], rescale=False
    )
    kept = (out - base) != 0
    ranks = (model - base).abs().argsort(-1).argsort(-1)
    freq = torch.tensor([kept[ranks == r].float().mean() for r in range(5)])
    torch.testing.assert_close(freq, torch.tensor([0.3, 0.4, 0.5, 0.6, 0.7]), atol=0.03, rtol=0)


def test_kept_entries_are_unchanged_or_l1_rescaled():
    base, model = _pair()
    delta = model - base
    plain = merge_tensors(
        "della_linear", [model], base=base, weight=[1.0], density=[0.4], epsilon=[0.1], rescale=False
    )
    kept = (plain - base) != 0
    torch.testing.assert_close((plain - base)[kept], delta[kept])
    scaled = merge_tensors("della_linear", [model], base=base, weight=[1.0], density=[0.4], epsilon=[0.1])
    torch.testing.assert_close((scaled - base).abs().sum(), delta.abs().sum(), rtol=1e-5, atol=1e-3)


def test_della_elects_signs_and_normalizes():
    base = torch.zeros(1, 3)
    a = torch.tensor([[1.0, 2.0, -1.0]])
    b = torch.tensor([[3.0, -4.0, -1.0]])
    # density just below 1 with epsilon 0 keeps each entry with probability 0.9999...; fix a seed where all survive
    out = merge_tensors(
        "della",
        [a, b],
        base=base,
        weight=[1.0, 1.0],
        density=[0.999999, 0.999999],
        epsilon=[0.0, 0.0],
        rescale=False,
    )
    torch.testing.assert_close(out, torch.tensor([[2.0, -4.0, -1.0]]))


def test_same_seed_same_result_and_seed_matters():
    base, model = _pair(20, 10)
    kw = dict(weight=[1.0], density=[0.5], epsilon=[0.1])
    a = merge_tensors("della", [model], base=base, seed=3, **kw)
    assert torch.equal(a, merge_tensors("della", [model], base=base, seed=3, **kw))
    assert not torch.equal(a, merge_tensors("della", [model], base=base, seed=4, **kw))


@pytest.mark.parametrize("method", ["della", "della_linear"])
def test_chunked_equals_whole(method):
    base, model = _pair(13, 9, seed=2)
    assert_chunk_invariant(
        method,
        [model, model * 0.5 + base * 0.5],
        base,
        weight=[1.0, 0.5],
        density=[0.5, 0.4],
        epsilon=[0.2, 0.1],
    )


def test_identical_inputs_return_the_input():
    base, _ = _pair(5, 5)
    out = merge_tensors("della", [base.clone()], base=base, weight=[1.0], density=[0.5], epsilon=[0.1])
    torch.testing.assert_close(out, base)
