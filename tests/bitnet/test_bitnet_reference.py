"""The blocked integer reference matmul equals the float computation on the ternary weights."""

from __future__ import annotations

import pytest
import torch
from transformers.integrations.bitnet import ActQuant

from _cli import run_command
from mergesmith.bitnet.reference import (
    TernaryLinear,
    fake_quantize_activations,
    quantize_activations,
    ternary_linear,
    ternary_matmul_int,
)
from mergesmith.core.bitnet.pack import pack_ternary
from mergesmith.core.bitnet.quant import Ternary, ternarize


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


@pytest.mark.parametrize("tied", [False, True])
def test_load_reference_model_from_a_packed_checkpoint(tmp_path, tiny, tied):
    """The packed checkpoint loads without unpacking: every converted linear holds the stored bytes,
    and the logits equal those of the reference model built from the float weights' codes."""
    import argparse
    import io

    from mergesmith.bitnet import command
    from mergesmith.bitnet.reference import load_reference_model, reference_model
    from mergesmith.core.bitnet.quant import ternarize_tensor

    model, config = tiny(attention_bias=True, tie_word_embeddings=tied)
    model.save_pretrained(tmp_path / "float")
    parser = argparse.ArgumentParser()
    command.register(parser.add_subparsers())
    args = parser.parse_args(["bitnet", str(tmp_path / "float"), str(tmp_path / "packed")])
    assert run_command(args, io.StringIO(), io.StringIO()) == 0

    ours = load_reference_model(tmp_path / "packed")
    ternary = [m for m in ours.modules() if isinstance(m, TernaryLinear)]
    assert len(ternary) == 14 and all(m.packed.dtype == torch.uint8 for m in ternary)
    assert not any(isinstance(m, torch.nn.Linear) and m.weight.shape[0] != 100 for m in ours.modules())
    if tied:
        assert ours.lm_head.weight is ours.model.embed_tokens.weight
    sd = model.state_dict()
    modules = [n[: -len(".packed")] for n, _ in ours.named_buffers() if n.endswith(".packed")]
    expected = reference_model(config, sd, {m: ternarize_tensor(sd[f"{m}.weight"]) for m in modules})
    ids = torch.tensor([[3, 14, 15, 92, 65, 35]])
    with torch.no_grad():
        a, b = ours(ids).logits, expected(ids).logits
    assert (a - b).abs().max().item() < 1e-5 * max(1.0, b.abs().max().item())
