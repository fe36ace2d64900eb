"""Invariants of the absmean ternary quantiser and of the tensor selection rule."""

from __future__ import annotations

import math

import pytest
import torch

from mergesmith.core.bitnet.quant import TensorSelector, as_ternary, ternarize


def _gaussian(rows: int = 1024, cols: int = 1024, seed: int = 0, std: float = 0.02) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, cols, generator=g) * std


def test_gaussian_zero_fraction_and_error():
    w = _gaussian()
    codes, scale = ternarize(w)
    zero_fraction = float((codes == 0).float().mean())
    # P(|z| < sqrt(2/pi)/2) = erf(1 / (2 sqrt(pi))) = 0.3101 for W ~ N(0, s^2)
    assert abs(zero_fraction - math.erf(1 / (2 * math.sqrt(math.pi)))) < 0.005
    rel_mse = float(((w - scale * codes.float()) ** 2).sum() / (w**2).sum())
    assert abs(rel_mse - 0.263) < 0.005


def test_scale_is_mean_abs_and_codes_are_ternary_int8():
    w = _gaussian(96, 200, seed=1, std=3.0)
    codes, scale = ternarize(w)
    assert codes.dtype == torch.int8 and codes.shape == w.shape
    assert set(codes.unique().tolist()) == {-1, 0, 1}
    assert torch.allclose(scale, w.abs().mean(), rtol=1e-6, atol=0)
    # round(W / gamma): codes follow the sign and the +-gamma/2 threshold
    assert torch.equal(
        codes[w.abs() > 0.5001 * scale], torch.sign(w)[w.abs() > 0.5001 * scale].to(torch.int8)
    )
    assert (codes[w.abs() < 0.4999 * scale] == 0).all()


def test_matches_transformers_weight_quant():
    """Codes * gamma equal transformers' online (QAT) WeightQuant output bit for bit."""
    from transformers.integrations.bitnet import WeightQuant

    for seed in range(3):
        w = _gaussian(64, 96, seed=seed)
        codes, scale = ternarize(w)
        theirs = WeightQuant.forward(None, w)
        assert torch.equal(codes.float() / (1.0 / scale), theirs)


def test_bf16_input_and_zero_matrix():
    w = _gaussian(8, 16).to(torch.bfloat16)
    codes, scale = ternarize(w)
    assert scale.dtype == torch.float32
    assert torch.allclose(scale, w.float().abs().mean())
    codes0, scale0 = ternarize(torch.zeros(4, 4))
    assert (codes0 == 0).all() and float(scale0) == pytest.approx(1e-5)


def test_as_ternary_detects_already_ternary():
    codes, scale = ternarize(_gaussian(32, 32))
    w = (codes.float() * scale).to(torch.bfloat16)
    t = as_ternary(w)
    assert t is not None and torch.equal(t.codes, codes)
    assert float(t.scale) == pytest.approx(float(scale), rel=1e-2)
    assert as_ternary(_gaussian(32, 32)) is None


@pytest.mark.parametrize(
    ("name", "shape", "expected"),
    [
        ("model.layers.0.self_attn.q_proj.weight", (64, 64), True),
        ("model.layers.11.mlp.down_proj.weight", (64, 128), True),
        ("model.layers.0.mlp.down_proj.bias", (64,), False),
        ("model.layers.0.input_layernorm.weight", (64,), False),
        ("model.layers.0.self_attn.attn_sub_norm.weight", (64,), False),
        ("model.embed_tokens.weight", (100, 64), False),
        ("lm_head.weight", (100, 64), False),
        ("model.norm.weight", (64,), False),
        ("transformer.h.0.attn.c_attn.weight", (64, 192), False),
    ],
)
def test_default_selection(name, shape, expected):
    assert TensorSelector().selects(name, shape) is expected


def test_include_exclude_patterns():
    sel = TensorSelector.from_patterns(include=[r"\.mlp\."], exclude=[r"layers\.1\."])
    assert sel.selects("model.layers.0.mlp.up_proj.weight", (8, 8))
    assert not sel.selects("model.layers.0.self_attn.q_proj.weight", (8, 8))
    assert not sel.selects("model.layers.1.mlp.up_proj.weight", (8, 8))
    # embeddings and the head stay in high precision even when included explicitly
    sel_all = TensorSelector.from_patterns(include=[".*"], exclude=None)
    assert not sel_all.selects("model.embed_tokens.weight", (8, 8))
    assert not sel_all.selects("lm_head.weight", (8, 8))
    assert sel_all.selects("transformer.h.0.attn.c_attn.weight", (8, 8))
    with pytest.raises(ValueError, match="invalid tensor pattern"):
        TensorSelector.from_patterns(include=["("], exclude=None)
