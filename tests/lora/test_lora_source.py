"""``model+adapter`` references: PEFT LoRA applied tensor by tensor equals PEFT's merge_and_unload."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from _lora_helpers import make_adapter, peft_merged, save_merged
from safetensors.torch import load_file, save_file

import mergesmith
from mergesmith.cli import main
from mergesmith.core.errors import MergeError
from mergesmith.core.lora.adapter import LoraSettings, pattern_value
from mergesmith.pipeline.execute import BASELINE_RSS

TINY_LIMIT = BASELINE_RSS + 8192  # every matrix in row chunks


def passthrough(ref: str) -> dict:
    return {"merge_method": "passthrough", "models": [{"model": ref}]}


def merged_tensors(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def assert_same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert set(got) <= set(want)
    for k, v in got.items():
        assert v.dtype == want[k].dtype, k
        assert torch.equal(v, want[k]), k


def test_lora_on_the_fly_equals_peft_merge_and_unload(llama_trio, llama_lora, tmp_path):
    base = llama_trio[0]
    out = mergesmith.merge(passthrough(f"{base}+{llama_lora}"), tmp_path / "out", quiet=True)
    got, want = merged_tensors(out), peft_merged(base, llama_lora)
    assert_same(got, want)
    untouched = load_file(base / "model.safetensors")
    changed = {k for k in got if not torch.equal(got[k], untouched[k])}
    assert "model.embed_tokens.weight" in changed and "lm_head.weight" in changed
    assert (
        "model.layers.1.self_attn.q_proj.weight" in changed
        and "model.layers.0.mlp.down_proj.weight" in changed
    )
    assert "model.layers.0.self_attn.k_proj.weight" not in changed


def test_row_chunked_reads_give_the_same_weights(llama_trio, llama_lora, tmp_path, fixed_baseline):
    base = llama_trio[0]
    whole = mergesmith.merge(passthrough(f"{base}+{llama_lora}"), tmp_path / "a", quiet=True)
    chunked = mergesmith.merge(
        passthrough(f"{base}+{llama_lora}"), tmp_path / "b", quiet=True, memory_limit=TINY_LIMIT, workers=1
    )
    a, b = merged_tensors(whole), merged_tensors(chunked)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-6, atol=1e-7)


def test_rslora(llama_trio, tmp_path):
    base = llama_trio[0]
    adapter = make_adapter(
        base,
        tmp_path / "rs",
        seed=3,
        r=4,
        lora_alpha=16,
        use_rslora=True,
        target_modules=["o_proj", "up_proj"],
    )
    out = mergesmith.merge(passthrough(f"{base}+{adapter}"), tmp_path / "out", quiet=True)
    assert_same(merged_tensors(out), peft_merged(base, adapter))


def test_gpt2_conv1d_fan_in_fan_out(model_factory, tmp_path):
    """GPT-2 stores Conv1D weights as (in, out); its square c_proj shows the orientation is not guessed."""
    base = model_factory(tmp_path / "gpt2", "gpt2")
    adapter = make_adapter(
        base, tmp_path / "lora", r=4, lora_alpha=4, fan_in_fan_out=True, target_modules=["c_attn", "c_proj"]
    )
    out = mergesmith.merge(passthrough(f"{base}+{adapter}"), tmp_path / "out", quiet=True)
    assert_same(merged_tensors(out), peft_merged(base, adapter))


def test_modules_to_save_replace_the_tensor(llama_trio, tmp_path):
    base = llama_trio[0]
    adapter = make_adapter(
        base, tmp_path / "mts", r=2, target_modules=["k_proj"], modules_to_save=["lm_head"]
    )
    weights = adapter / "adapter_model.safetensors"
    tensors = load_file(weights)
    tensors["base_model.model.lm_head.weight"] = tensors["base_model.model.lm_head.weight"] * 2
    save_file(tensors, weights, metadata={"format": "pt"})
    out = mergesmith.merge(passthrough(f"{base}+{adapter}"), tmp_path / "out", quiet=True)
    got, want = merged_tensors(out), peft_merged(base, adapter)
    assert_same(got, want)
    assert torch.equal(got["lm_head.weight"], load_file(base / "model.safetensors")["lm_head.weight"] * 2)


def test_bfloat16_within_one_rounding_of_peft(model_factory, tmp_path):
    base = model_factory(tmp_path / "base", "llama", seed=5)
    bf16 = tmp_path / "bf16"
    shutil.copytree(base, bf16)
    tensors = {k: v.to(torch.bfloat16) for k, v in load_file(bf16 / "model.safetensors").items()}
    save_file(tensors, bf16 / "model.safetensors", metadata={"format": "pt"})
    adapter = make_adapter(bf16, tmp_path / "lora", dtype=torch.bfloat16, r=4, target_modules=["q_proj"])
    out = mergesmith.merge(passthrough(f"{bf16}+{adapter}"), tmp_path / "out", quiet=True)
    got, want = merged_tensors(out), peft_merged(bf16, adapter, dtype=torch.bfloat16)
    for k, v in got.items():
        assert v.dtype == torch.bfloat16
        # we round W + delta once; PEFT rounds delta, then the sum: at most one bf16 step apart
        torch.testing.assert_close(v.float(), want[k].float(), rtol=2**-7, atol=2**-14)


def test_lora_reference_inside_a_ties_merge(llama_trio, llama_lora, tmp_path):
    """``ft+lora`` in a TIES merge gives the same bytes as merging a materialised copy (mergekit's way)."""
    base, ft1, ft2 = llama_trio
    materialised = save_merged(ft1, llama_lora, tmp_path / "ft1-merged")

    def ties(model: str) -> dict:
        return {
            "merge_method": "ties",
            "base_model": str(base),
            "models": [
                {"model": model, "parameters": {"weight": 0.6, "density": 0.5}},
                {"model": str(ft2), "parameters": {"weight": 0.4, "density": 0.7}},
            ],
        }

    on_the_fly = mergesmith.merge(ties(f"{ft1}+{llama_lora}"), tmp_path / "a", quiet=True)
    reference = mergesmith.merge(ties(str(materialised)), tmp_path / "b", quiet=True)
    a, b = merged_tensors(on_the_fly), merged_tensors(reference)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    plain = merged_tensors(mergesmith.merge(ties(str(ft1)), tmp_path / "c", quiet=True))
    assert not torch.equal(
        a["model.layers.0.self_attn.q_proj.weight"], plain["model.layers.0.self_attn.q_proj.weight"]
    )


def test_pattern_rule_matches_peft():
    s = LoraSettings(
        r=8, alpha=16, rank_pattern={"layers.1.self_attn.q_proj": 2}, alpha_pattern={"v_proj": 4}
    )
    assert s.rank("model.layers.1.self_attn.q_proj") == 2
    assert s.rank("model.layers.11.self_attn.q_proj") == 8  # dots are boundaries, not substrings
    assert s.scale("model.layers.1.self_attn.q_proj") == 8.0
    assert s.scale("model.layers.0.self_attn.v_proj") == 0.5
    assert pattern_value({"proj": 1}, "model.q_proj", 0) == 0  # whole segments only


def _edit_config(adapter: Path, **changes) -> None:
    p = adapter / "adapter_config.json"
    cfg = json.loads(p.read_text())
    cfg.update(changes)
    p.write_text(json.dumps(cfg))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"use_dora": True}, "DoRA"),
        ({"peft_type": "IA3"}, "IA3 adapter"),
        ({"r": 3}, "rank"),
        ({"lora_bias": True}, "LoRA biases"),
    ],
)
def test_unsupported_adapters_are_one_line_errors(llama_trio, llama_lora, tmp_path, capsys, change, message):
    adapter = tmp_path / "adapter"
    shutil.copytree(llama_lora, adapter)
    _edit_config(adapter, **change)
    cfg = tmp_path / "cfg.yml"
    cfg.write_text(json.dumps(passthrough(f"{llama_trio[0]}+{adapter}")))
    capsys.readouterr()
    assert main(["merge", str(cfg), str(tmp_path / "out"), "-q"]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_adapter_for_another_model_size(llama_lora, model_factory, tmp_path):
    other = model_factory(tmp_path / "other", "llama", vocab=128)
    with pytest.raises(MergeError, match="resized vocabulary|another model size"):
        mergesmith.merge(passthrough(f"{other}+{llama_lora}"), tmp_path / "out", quiet=True)


def test_missing_adapter_and_pickled_adapter(llama_trio, llama_lora, tmp_path):
    base = llama_trio[0]
    with pytest.raises(MergeError, match="LoRA adapter.*not found"):
        mergesmith.merge(passthrough(f"{base}+{tmp_path / 'nope'}"), tmp_path / "out", quiet=True)
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy(llama_lora / "adapter_config.json", pickled)
    (pickled / "adapter_model.bin").write_bytes(b"")
    with pytest.raises(MergeError, match="convert them to safetensors"):
        mergesmith.merge(passthrough(f"{base}+{pickled}"), tmp_path / "out", quiet=True)


def test_lora_on_a_stage_output_and_adapter_changes_rerun(llama_trio, llama_lora, tmp_path, capsys):
    """``stage+adapter`` is planned against the stage's planned output and applied to what it wrote; a
    changed adapter makes every stage that uses it run again."""
    import yaml

    base, ft1, ft2 = llama_trio
    adapter = tmp_path / "adapter"
    shutil.copytree(llama_lora, adapter)
    docs = [
        {
            "name": "soup",
            "merge_method": "linear",
            "models": [{"model": f"{ft1}+{adapter}"}, {"model": str(ft2)}],
            "parameters": {"weight": 0.5},
        },
        {"merge_method": "passthrough", "models": [{"model": f"soup+{adapter}"}]},
    ]
    cfg = tmp_path / "stages.yml"
    cfg.write_text(yaml.safe_dump_all(docs))
    args = ["merge", str(cfg), str(tmp_path / "out"), "-I", str(tmp_path / "i")]
    capsys.readouterr()
    assert main(args) == 0
    assert_same(merged_tensors(tmp_path / "out"), peft_merged(tmp_path / "i" / "soup", adapter))

    weights = adapter / "adapter_model.safetensors"
    tensors = load_file(weights)
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
    tensors[key] = tensors[key] * 2
    save_file(tensors, weights, metadata={"format": "pt"})
    capsys.readouterr()
    assert main([*args, "--overwrite"]) == 0
    err = capsys.readouterr().err
    assert f"input '{ft1}+{adapter}' changed" in err and f"input 'soup+{adapter}' changed" in err
    assert_same(merged_tensors(tmp_path / "out"), peft_merged(tmp_path / "i" / "soup", adapter))
