import pytest
import torch

from mergesmith.core.errors import MergeError
from mergesmith.methods import merge_tensors


def test_golden_weighted_average():
    a = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    b = torch.tensor([[3.0, 0.0], [-1.0, 8.0]])
    # (1*a + 3*b) / 4
    expected = torch.tensor([[2.5, 0.5], [0.0, 7.0]])
    assert torch.equal(merge_tensors("linear", [a, b], weight=[1.0, 3.0]), expected)


def test_without_normalize_is_plain_weighted_sum():
    a, b = torch.ones(3), torch.full((3,), 2.0)
    out = merge_tensors("linear", [a, b], weight=[0.5, 2.0], normalize=False)
    assert torch.equal(out, torch.full((3,), 4.5))


def test_identical_inputs_give_the_input():
    x = torch.randn(7, 5)
    out = merge_tensors("linear", [x, x, x], weight=[0.2, 0.3, 0.5])
    assert torch.allclose(out, x, atol=1e-6)


def test_weights_summing_to_zero_are_an_error():
    with pytest.raises(MergeError, match="sum to 0"):
        merge_tensors("linear", [torch.ones(2), torch.ones(2)], weight=[1.0, -1.0])


def test_inputs_are_not_modified():
    a, b = torch.ones(4), torch.zeros(4)
    merge_tensors("linear", [a, b], weight=[1.0, 1.0])
    assert torch.equal(a, torch.ones(4)) and torch.equal(b, torch.zeros(4))
