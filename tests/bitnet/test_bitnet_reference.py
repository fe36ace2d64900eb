"""The blocked integer reference matmul equals the float computation on the ternary weights."""

from __future__ import annotations

import pytest
import torch
from transformers.integrations.bitnet import ActQuant

from mergesmith.bitnet.pack import pack_ternary
from mergesmith.bitnet.quant import Ternary, ternarize
from mergesmith.bitnet.reference import (
    TernaryLinear,
    fake_quantize_activations,
    quantize_activations,
    ternary_linear,
    ternary_matmul_int,
)


def _data(rows, cols, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * 0.05
    x = torch.randn(3, 5, cols, generator=g) * 2.0
    return w, x


def test_activation_quant_matches_transformers():
    _, x = _data(4, 48)
    x_q, s_x = quantize_activations(x)
    assert x_q.dtype == torch.int8 and s_x.shape == (3, 5, 1)
    assert torch.equal(x_q.abs().amax(dim=-1), torch.full((3, 5), 127, dtype=torch.int8))
    assert torch.equal(fake_quantize_activations(x), ActQuant.forward(None, x))


@pytest.mark.parametrize(
    ("rows", "cols", "block_rows", "block_cols"), [(64, 96, 64, 1024), (67, 50, 3, 7), (5, 33, 1, 8)]
)
def test_reference_matmul_equals_float(rows, cols, block_rows, block_cols):
    w, x = _data(rows, cols, seed=rows)
    codes, gamma = ternarize(w)
    packed = pack_ternary(codes)
    bias = torch.randn(rows) * 0.1
    y = ternary_linear(x, packed, rows, gamma, bias, block_rows=block_rows, block_cols=block_cols)
    # float computation: fake-quantised activations times dequantised weights, in float64
    x_fq = fake_quantize_activations(x).double()
    expected = x_fq @ (codes.double() * gamma.double()).T + bias.double()
    assert y.shape == (3, 5, rows)
    rel = ((y.double() - expected).abs().max() / expected.abs().max()).item()
    assert rel < 1e-6
    # the integer accumulator is exact
    x_q, _ = quantize_activations(x)
    acc = ternary_matmul_int(x_q, packed, rows, block_rows, block_cols)
    assert acc.dtype == torch.int32
    assert torch.equal(acc.double(), x_q.double() @ codes.double().T)


def test_ternary_linear_module_and_shape_errors():
    w, x = _data(8, 16)
    codes, gamma = ternarize(w)
    mod = TernaryLinear(Ternary(codes, gamma))
    assert mod(x).shape == (3, 5, 8) and mod.packed.dtype == torch.uint8 and mod.packed.shape == (2, 16)
    assert mod(x.double()).dtype == torch.float64 and mod(x.bfloat16()).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="features"):
        ternary_matmul_int(torch.zeros(2, 15, dtype=torch.int8), mod.packed, 8)
