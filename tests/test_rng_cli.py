"""The random stream behind DARE masks, and the command line's start-up cost."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mergesmith.core.rng import RandomStream


@settings(max_examples=30, deadline=None)
@given(
    numel=st.integers(1, 5000),
    cut=st.integers(0, 5000),
    first=st.sampled_from([0, 7, (1 << 32) - 3000, 5 << 32]),
    p=st.floats(0.0, 1.0),
)
def test_keep_mask_is_the_same_however_it_is_cut(numel, cut, first, p):
    """Also across the 2**32 boundary, where the high half of the element index changes."""
    stream = RandomStream(3, "w", 1)
    whole = stream.keep(first, numel, p)
    cut = min(cut, numel)
    parts = torch.cat([stream.keep(first, cut, p), stream.keep(first + cut, numel - cut, p)])
    assert whole.dtype == torch.bool and whole.shape == (numel,)
    assert torch.equal(whole, parts)
    # the fused mask-and-multiply keeps exactly the same elements
    x = np.linspace(1.0, 2.0, numel, dtype=np.float32)
    assert np.array_equal(stream.mask(x.copy(), first, p), x * whole.numpy())


def test_keep_mask_streams_differ_above_2_to_the_32():
    """Indices that differ only in their high half get unrelated draws."""
    stream = RandomStream(0, "w", 0)
    assert not torch.equal(stream.keep(0, 4096, 0.5), stream.keep(1 << 32, 4096, 0.5))


def test_keep_mask_probability_and_edges():
    stream = RandomStream(0, "t", 0)
    for p in (0.1, 0.5, 0.9):
        share = stream.keep(0, 1 << 21, p).float().mean().item()
        # 2M Bernoulli draws: the standard deviation of the share is under 4e-4
        assert abs(share - p) < 3e-3
    assert stream.keep(0, 1000, 1.0).all()
    assert not stream.keep(0, 1000, 0.0).any()
    # another model index or tensor name gives another mask
    other = RandomStream(0, "t", 1).keep(0, 4096, 0.5)
    assert not torch.equal(other, stream.keep(0, 4096, 0.5))


def test_keep_mask_is_fixed_for_a_seed():
    """The stream is part of the output format: a change here changes every DARE merge."""
    a = RandomStream(1234, "model.layers.0.mlp.up_proj.weight", 0).keep(0, 64, 0.5)
    b = RandomStream(1234, "model.layers.0.mlp.up_proj.weight", 0).keep(0, 64, 0.5)
    assert torch.equal(a, b)
    assert 16 < int(a.sum()) < 48


@pytest.mark.parametrize("argv", [["--help"], ["merge", "--help"]])
def test_cli_help_does_not_import_torch_or_transformers(argv):
    code = (
        "import sys\n"
        f"sys.argv = ['mergesmith', *{argv!r}]\n"
        "try:\n"
        "    from mergesmith.cli import main\n"
        "    main(sys.argv[1:])\n"
        "except SystemExit:\n"
        "    pass\n"
        "heavy = [m for m in ('torch', 'transformers') if m in sys.modules]\n"
        "print('HEAVY', heavy)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "HEAVY []" in out


def test_keep_mask_with_one_probability_per_element():
    n = 1 << 20
    stream = RandomStream(5, "w", 0)
    p = torch.linspace(0.0, 1.0, n, dtype=torch.float64)
    keep = stream.keep(0, n, p)
    assert not keep[0] and keep[-1]  # probability 0 and 1 are exact
    # the kept share in each quarter matches its mean probability (1/8, 3/8, 5/8, 7/8)
    for q, expected in enumerate((0.125, 0.375, 0.625, 0.875)):
        share = keep[q * n // 4 : (q + 1) * n // 4].double().mean().item()
        assert abs(share - expected) < 5e-3
    # a constant tensor gives the same mask as the scalar
    assert torch.equal(stream.keep(0, n, torch.full((n,), 0.3)), stream.keep(0, n, 0.3))


def test_keep_mask_resolves_probabilities_finer_than_16_bits():
    """Every element draws 32 bits: the probability is exact to 2**-32, not 2**-16."""
    n = 1 << 24
    tiny = 3.5 / 65536  # halfway between two 16-bit steps
    kept = int(RandomStream(9, "w", 0).keep(0, n, tiny).sum())
    expected = n * tiny  # 896; 16-bit resolution would give 768 or 1024 (sd ~30)
    assert abs(kept - expected) < 90
