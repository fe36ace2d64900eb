"""Iso-C and Iso-CTS (methods/isotropic.py)."""

from __future__ import annotations

import pytest
import torch

from mergesmith.methods import get_method, merge_tensors
from mergesmith.methods.isotropic import common_space_size


def _tasks(n: int = 3, shape=(9, 6), seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(*shape, generator=g)
    return base, [base + torch.randn(*shape, generator=g) * (i + 1) for i in range(n)]


@pytest.mark.parametrize("method", ["iso_c", "iso_cts"])
def test_output_has_a_flat_spectrum(method):
    base, models = _tasks()
    s = torch.linalg.svdvals(merge_tensors(method, models, base=base) - base)
    torch.testing.assert_close(s, s.mean().expand_as(s), atol=1e-4, rtol=1e-4)


def test_iso_c_golden():
    base = torch.zeros(2, 2)
    a, b = torch.diag(torch.tensor([3.0, 0.0])), torch.diag(torch.tensor([0.0, 1.0]))
    # sum = diag(3, 1): singular values 3 and 1 become 2 each
    torch.testing.assert_close(
        merge_tensors("iso_c", [a, b], base=base), torch.diag(torch.tensor([2.0, 2.0]))
    )
    torch.testing.assert_close(
        merge_tensors("iso_c", [a, b], base=base, alpha=1.5), torch.diag(torch.tensor([3.0, 3.0]))
    )


def test_iso_c_keeps_the_singular_vectors_of_the_sum():
    base, models = _tasks(2)
    total = sum(m - base for m in models)
    u, s, vh = torch.linalg.svd(total, full_matrices=False)
    out = merge_tensors("iso_c", models, base=base)
    torch.testing.assert_close(out - base, s.mean() * u @ vh, atol=1e-5, rtol=1e-5)


def test_iso_cts_with_all_common_space_is_iso_c():
    base, models = _tasks()
    torch.testing.assert_close(
        merge_tensors("iso_cts", models, base=base, common_space_fraction=1.0),
        merge_tensors("iso_c", models, base=base),
        atol=1e-5,
        rtol=1e-5,
    )


def test_iso_cts_adds_task_specific_directions():
    base = torch.zeros(4, 4)
    a = torch.diag(torch.tensor([4.0, 3.0, 0.0, 0.0]))
    b = torch.diag(torch.tensor([0.0, 0.0, 0.0, 1.0]))  # weak task, outside the common subspace
    # r = 4, c = int(4 * 0.5) = 2, s = 1 per task: common e0, e1; a adds nothing new (its residue is 0, its
    # top direction is arbitrary in the null space), b adds e3
    out = merge_tensors("iso_cts", [a, b], base=base, common_space_fraction=0.5)
    assert float(out[3, 3]) > 0.5  # Iso-C would keep b only at its share of the flattened sum
    s = torch.linalg.svdvals(out)
    torch.testing.assert_close(s, s.mean().expand_as(s), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("rank", "tasks", "fraction", "expected"),
    [
        (768, 8, 0.8, (616, 19)),
        (6, 3, 0.8, (3, 1)),
        (10, 2, 0.8, (8, 1)),
        (1, 1, 0.8, (0, 1)),
        (4, 2, 0.5, (2, 1)),
    ],
)
def test_common_space_size(rank, tasks, fraction, expected):
    assert common_space_size(rank, tasks, fraction) == expected


@pytest.mark.parametrize("method", ["iso_c", "iso_cts"])
def test_vectors_take_the_mean_task_vector(method):
    base = torch.zeros(3)
    out = merge_tensors(method, [torch.tensor([1.0, 2, 3]), torch.tensor([3.0, 2, 1])], base=base)
    torch.testing.assert_close(out, torch.tensor([2.0, 2.0, 2.0]))


@pytest.mark.parametrize("method", ["iso_c", "iso_cts"])
def test_not_chunkable(method):
    assert get_method(method).chunkable is False
