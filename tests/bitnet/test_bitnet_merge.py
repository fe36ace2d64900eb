"""Merging ternary models: packed BitNet inputs, and ``--out-format bitnet`` output."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import transformers
import yaml
from safetensors.torch import load_file, save_file

import mergesmith
from mergesmith import cli
from mergesmith.core.bitnet.hf import gamma_from_weight_scale
from mergesmith.core.bitnet.pack import pack_ternary, unpack_ternary
from mergesmith.core.bitnet.quant import ternarize
from mergesmith.core.bitnet.source import BitnetModelSource
from mergesmith.core.errors import MergeError
from mergesmith.core.sources import open_checkpoint
from mergesmith.pipeline.execute import BASELINE_RSS

TINY_LIMIT = BASELINE_RSS + 8192  # a few KiB in flight: every matrix is merged in row chunks


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _bitnet(model: Path, out: Path, *extra: str) -> Path:
    assert cli.main(["bitnet", str(model), str(out), *extra]) == 0
    return out


def _dequantised(packed: Path, out: Path) -> Path:
    """The float model a packed checkpoint stands for, written as an ordinary checkpoint."""
    src = open_checkpoint(str(packed))
    assert isinstance(src, BitnetModelSource)
    shutil.copytree(packed, out, ignore=shutil.ignore_patterns("*.safetensors", "config.json"))
    save_file({n: src.read(n) for n in src.tensors}, out / "model.safetensors", {"format": "pt"})
    (out / "config.json").write_text(json.dumps(src.config))
    return out


def _ties(base: Path, *models: Path) -> dict:
    return {
        "merge_method": "ties",
        "base_model": str(base),
        "models": [{"model": str(m), "parameters": {"weight": 0.7, "density": 0.6}} for m in models],
    }


@pytest.fixture(scope="module")
def trio(tmp_path_factory, llama_trio):
    """base, a packed BitNet export of fine-tune 1, its dequantised float twin, fine-tune 2."""
    root = tmp_path_factory.mktemp("bitnet-merge")
    base, ft1, ft2 = llama_trio
    packed = _bitnet(ft1, root / "ft1-bitnet")
    return base, packed, _dequantised(packed, root / "ft1-float"), ft2


@pytest.mark.parametrize("memory_limit", [None, TINY_LIMIT])
def test_merge_with_a_bitnet_input_equals_the_dequantised_merge(trio, tmp_path, memory_limit, fixed_baseline):
    base, packed, floating, ft2 = trio
    kw = dict(quiet=True, memory_limit=memory_limit, workers=2)
    a = mergesmith.merge(_ties(base, packed, ft2), tmp_path / "a", **kw)
    b = mergesmith.merge(_ties(base, floating, ft2), tmp_path / "b", **kw)
    ta, tb = _tensors(a), _tensors(b)
    assert ta.keys() == tb.keys() and not any(n.endswith("weight_scale") for n in ta)
    for name in ta:
        assert ta[name].dtype == tb[name].dtype and torch.equal(ta[name], tb[name]), name
    assert "quantization_config" not in json.loads((a / "config.json").read_text())


def test_bitnet_model_as_base_gives_a_float_merge(trio, tmp_path):
    """The packed model's config is the output's, without its quantization_config."""
    _, packed, floating, ft2 = trio
    out = mergesmith.merge(_ties(packed, ft2), tmp_path / "o", quiet=True)
    ref = mergesmith.merge(_ties(floating, ft2), tmp_path / "r", quiet=True)
    cfg = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in cfg
    assert cfg == json.loads((ref / "config.json").read_text())
    assert all(torch.equal(v, _tensors(ref)[k]) for k, v in _tensors(out).items())


def _check_ternary_output(out: Path, float_out: Path, exact: bool = True) -> int:
    """Every converted tensor of ``out`` is ternarise(the float merge); the rest equal the float merge.
    Returns the number of converted modules."""
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "bitnet" and qc["linear_class"] == "autobitlinear"
    ternary, merged = _tensors(out), _tensors(float_out)
    modules = [n[: -len(".weight_scale")] for n in ternary if n.endswith(".weight_scale")]
    assert modules
    for name, tensor in merged.items():
        module = name.rsplit(".", 1)[0]
        if module not in modules:
            assert torch.equal(ternary[name], tensor), name
            continue
        if name.endswith(".bias"):
            scale = ternary[f"{module}.weight_scale"].float()
            assert torch.equal(ternary[name], (tensor.float() / scale).to(tensor.dtype)), name
            continue
        codes, gamma = ternarize(tensor)
        got = gamma_from_weight_scale(ternary[f"{module}.weight_scale"], "autobitlinear")
        if exact:
            assert torch.equal(ternary[name], pack_ternary(codes)), name
            assert float(got) == float(gamma.to(tensor.dtype)), name
        else:  # row chunks: gamma from a float64 sum; a code may flip right at a rounding threshold
            flipped = (unpack_ternary(ternary[name], tensor.shape[0]) != codes).float().mean()
            assert flipped < 1e-3 and float(got) == pytest.approx(float(gamma), rel=1e-6), name
    return len(modules)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_out_format_bitnet_is_ternarised_merge_and_loads(family, family_models, tmp_path):
    """qwen2 has q/k/v biases: autobitlinear stores b / weight_scale, written after the weight."""
    base, ft = family_models[family]
    cfg = _ties(base, ft)
    out = mergesmith.merge(cfg, tmp_path / "t", quiet=True, out_format="bitnet", workers=1)
    ref = mergesmith.merge(cfg, tmp_path / "f", quiet=True)
    n_layers = json.loads((base / "config.json").read_text())["num_hidden_layers"]
    assert _check_ternary_output(out, ref) == 7 * n_layers
    model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(model.model.layers[0].mlp.up_proj).__name__ == "AutoBitLinear"
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[1, 2, 3, 4]])).logits).all()


def test_out_format_bitnet_in_row_chunks(llama_trio, tmp_path, fixed_baseline):
    base, ft1, ft2 = llama_trio
    cfg = _ties(base, ft1, ft2)
    out = mergesmith.merge(cfg, tmp_path / "t", quiet=True, out_format="bitnet", memory_limit=TINY_LIMIT)
    ref = mergesmith.merge(cfg, tmp_path / "f", quiet=True)
    _check_ternary_output(out, ref, exact=False)
    transformers.AutoModelForCausalLM.from_pretrained(out)


@pytest.mark.parametrize("memory_limit", [None, TINY_LIMIT])
def test_a_ternary_model_merged_alone_round_trips(trio, tmp_path, memory_limit, fixed_baseline):
    """linear with one packed model: the merged tensors are already ternary and keep their scale, so
    the output is the input checkpoint again, tensor for tensor."""
    _, packed, _, _ = trio
    cfg = {"merge_method": "linear", "models": [{"model": str(packed), "parameters": {"weight": 1.0}}]}
    out = mergesmith.merge(cfg, tmp_path / "o", quiet=True, out_format="bitnet", memory_limit=memory_limit)
    mine, theirs = _tensors(out), _tensors(packed)
    assert mine.keys() == theirs.keys()
    for name, tensor in theirs.items():
        assert torch.equal(mine[name], tensor), name


def test_cli_out_format_and_one_line_errors(trio, family_models, tmp_path, capsys):
    base, packed, _, ft2 = trio
    cfg = tmp_path / "cfg.yml"
    cfg.write_text(yaml.safe_dump(_ties(base, packed, ft2)))
    assert cli.main(["merge", str(cfg), str(tmp_path / "out"), "--out-format", "bitnet", "-q"]) == 0
    assert "quantization_config" in json.loads((tmp_path / "out" / "config.json").read_text())
    # gpt2 has Conv1D layers, no nn.Linear in its blocks: nothing to ternarise
    gpt2_base, gpt2_ft = family_models["gpt2"]
    bad = tmp_path / "gpt2.yml"
    bad.write_text(yaml.safe_dump(_ties(gpt2_base, gpt2_ft)))
    capsys.readouterr()
    assert cli.main(["merge", str(bad), str(tmp_path / "g"), "--out-format", "bitnet", "-q"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mergesmith: error: --out-format bitnet: no merged tensor")
    assert not (tmp_path / "g").exists()
    with pytest.raises(MergeError, match="unknown output format"):
        mergesmith.merge(_ties(base, ft2), tmp_path / "x", out_format="ternary")


def test_multi_stage_files_refuse_out_format_bitnet(llama_trio, tmp_path):
    base, ft1, ft2 = llama_trio
    stages = [{**_ties(base, ft1), "name": "first"}, _ties(base, "first", ft2)]
    with pytest.raises(MergeError, match="not supported for multi-stage files"):
        mergesmith.merge(stages, tmp_path / "o", out_format="bitnet")
    assert not (tmp_path / "o").exists()


def test_bitnet_command_reads_model_plus_lora(llama_trio, tmp_path):
    """`mergesmith bitnet MODEL+ADAPTER` ternarises the model with the adapter applied as it is read:
    the same codes as exporting PEFT's merge_and_unload of it."""
    peft = pytest.importorskip("peft")
    base = llama_trio[0]
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_pretrained(base)
    cfg = peft.LoraConfig(init_lora_weights=False, r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"])
    peft.get_peft_model(model, cfg).save_pretrained(tmp_path / "adapter")
    merged = peft.PeftModel.from_pretrained(
        transformers.AutoModelForCausalLM.from_pretrained(base), tmp_path / "adapter"
    ).merge_and_unload()
    merged.save_pretrained(tmp_path / "merged")
    ours = _tensors(_bitnet(Path(f"{base}+{tmp_path / 'adapter'}"), tmp_path / "ours"))
    theirs = _tensors(_bitnet(tmp_path / "merged", tmp_path / "theirs"))
    plain = _tensors(_bitnet(base, tmp_path / "plain"))
    assert ours.keys() == theirs.keys()
    changed = 0
    for name, tensor in theirs.items():
        if tensor.dtype == torch.uint8:
            codes, ref = unpack_ternary(ours[name]), unpack_ternary(tensor)
            assert (codes != ref).float().mean() < 1e-3, name  # float rounding at a threshold, at most
            changed += int(not torch.equal(ours[name], plain[name]))
        else:
            assert torch.allclose(ours[name].float(), tensor.float(), rtol=1e-5, atol=1e-6), name
    assert changed == 6  # q_proj and down_proj of 3 layers


def test_lora_on_a_packed_base_reads_like_lora_on_its_float_twin(trio, tmp_path):
    """`packed+adapter`: the LoRA delta is added to gamma * W~ as it is read."""
    peft = pytest.importorskip("peft")
    from mergesmith.core.sources import open_source

    _, packed, floating, _ = trio
    torch.manual_seed(1)
    model = transformers.AutoModelForCausalLM.from_pretrained(floating)
    cfg = peft.LoraConfig(init_lora_weights=False, r=2, lora_alpha=4, target_modules=["up_proj", "o_proj"])
    peft.get_peft_model(model, cfg).save_pretrained(tmp_path / "adapter")
    a = open_source(f"{packed}+{tmp_path / 'adapter'}")
    b = open_source(f"{floating}+{tmp_path / 'adapter'}")
    assert isinstance(a.base, BitnetModelSource)
    for name in ("model.layers.1.mlp.up_proj.weight", "model.layers.0.self_attn.o_proj.weight"):
        assert torch.equal(a.read(name), b.read(name)) and torch.equal(
            a.read(name, (3, 9)), b.read(name, (3, 9))
        )
        assert not torch.equal(a.read(name), a.base.read(name))
