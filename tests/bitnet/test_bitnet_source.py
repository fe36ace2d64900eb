"""BitnetModelSource: a packed BitNet checkpoint reads back as codes x gamma, whole or by rows."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from mergesmith.bitnet.convert import DictSource, export_hf
from mergesmith.core.bitnet.hf import export_config
from mergesmith.core.bitnet.pack import chunk_spans, pack_ternary
from mergesmith.core.bitnet.quant import ternarize
from mergesmith.core.bitnet.source import BitnetModelSource, PackedTensorInfo
from mergesmith.core.errors import MergeError
from mergesmith.core.sources import open_checkpoint


def _packed_folder(tmp_path, tiny, linear_class, dtype=torch.float32, bias=False):
    model, config = tiny(attention_bias=bias)
    model = model.to(dtype)
    config["dtype"] = str(dtype).removeprefix("torch.")
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    result = export_hf(DictSource(sd, config), linear_class=linear_class)
    folder = tmp_path / f"packed-{linear_class}"
    folder.mkdir()
    save_file(result.tensors, folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps(result.config))
    return folder, sd, result


def _ranges(rows):
    r = rows // 4
    return [(0, rows), (0, 1), (3, 10), (r - 1, r + 1), (r - 2, 3 * r + 1), (rows - 3, rows), (5, 5)]


@pytest.mark.parametrize("linear_class", ["autobitlinear", "bitlinear"])
def test_reads_back_codes_times_gamma(tmp_path, tiny, linear_class):
    folder, sd, result = _packed_folder(tmp_path, tiny, linear_class, bias=True)
    src = open_checkpoint(str(folder))
    assert isinstance(src, BitnetModelSource)
    assert "quantization_config" not in src.config and "quantization_config" in src.stored_config
    assert not any(n.endswith("weight_scale") for n in src.tensors)
    assert set(src.tensors) == set(sd)
    for s in result.stats:
        info = src.tensors[s.name]
        assert isinstance(info, PackedTensorInfo) and info.shape == tuple(sd[s.name].shape)
        assert info.dtype == torch.float32
        codes, gamma = ternarize(sd[s.name])
        expected = codes.float() * src.gamma(s.name[: -len(".weight")])
        assert float(src.gamma(s.name[: -len(".weight")])) == pytest.approx(float(gamma), rel=1e-6)
        for r0, r1 in _ranges(info.shape[0]):
            assert torch.equal(src.read(s.name, (r0, r1)), expected[r0:r1]), (s.name, r0, r1)
        assert torch.equal(src.read(s.name), expected)
    # biases come back as the float model's (autobitlinear stores b / gamma)
    bias = "model.layers.0.self_attn.q_proj.bias"
    assert torch.allclose(src.read(bias), sd[bias], rtol=1e-6, atol=0)
    assert torch.equal(src.read("model.embed_tokens.weight"), sd["model.embed_tokens.weight"])
    src.close()


def test_bf16_autobitlinear_reads_in_the_model_dtype(tmp_path, tiny):
    folder, sd, result = _packed_folder(tmp_path, tiny, "autobitlinear", torch.bfloat16)
    src = open_checkpoint(str(folder))
    name = result.stats[0].name
    w = src.read(name)
    assert w.dtype == torch.bfloat16 and src.tensors[name].dtype == torch.bfloat16
    scale = result.tensors[name[: -len(".weight")] + ".weight_scale"]
    codes, _ = ternarize(sd[name])
    assert torch.equal(w, (codes.float() * scale.float()).to(torch.bfloat16))


def _odd_rows_folder(tmp_path, rows=13, cols=8):
    """A hand-written packed checkpoint with a 13-row matrix (transformers itself cannot load this)."""
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(-1, 2, (rows, cols), generator=g, dtype=torch.int8)
    tensors = {
        "model.layers.0.mlp.up_proj.weight": pack_ternary(codes),
        "model.layers.0.mlp.up_proj.weight_scale": torch.tensor([0.25]),
        "model.embed_tokens.weight": torch.randn(4, cols, generator=g),
    }
    folder = tmp_path / "odd"
    folder.mkdir()
    save_file(tensors, folder / "model.safetensors")
    config = export_config({"model_type": "llama", "num_hidden_layers": 1}, ["lm_head"], "autobitlinear")
    (folder / "config.json").write_text(json.dumps(config))
    return folder, codes


def test_rows_not_a_multiple_of_four(tmp_path):
    folder, codes = _odd_rows_folder(tmp_path)
    name = "model.layers.0.mlp.up_proj.weight"
    src = BitnetModelSource(str(folder), folder, out_features={"model.layers.0.mlp.up_proj": 13})
    assert src.tensors[name].shape == (13, 8)
    expected = codes.float() * 0.25
    for r0 in range(14):
        for r1 in range(r0, 14):
            assert torch.equal(src.read(name, (r0, r1)), expected[r0:r1]), (r0, r1)
    default = open_checkpoint(str(folder))  # without the true row count: 4 * R = 16 rows
    assert default.tensors[name].shape == (16, 8)
    assert torch.equal(default.read(name)[:13], expected)
    with pytest.raises(MergeError, match="do not pack"):
        _ = BitnetModelSource(str(folder), folder, out_features={"model.layers.0.mlp.up_proj": 17}).tensors


def test_chunk_spans_cover_each_row_once():
    for packed in (1, 3, 4):
        for u0 in range(4 * packed + 1):
            for u1 in range(u0, 4 * packed + 1):
                rows = [i * packed + r for i, p0, p1 in chunk_spans((u0, u1), packed) for r in range(p0, p1)]
                assert rows == list(range(u0, u1))


def test_malformed_packed_weight_is_a_one_line_error(tmp_path):
    folder, _ = _odd_rows_folder(tmp_path)
    tensors = {
        "model.layers.0.mlp.up_proj.weight": torch.zeros(4, 8),
        "model.layers.0.mlp.up_proj.weight_scale": torch.tensor([0.5]),
    }
    save_file(tensors, folder / "model.safetensors")
    with pytest.raises(MergeError, match="not a packed uint8 matrix") as exc:
        open_checkpoint(str(folder))
    assert "\n" not in str(exc.value)
