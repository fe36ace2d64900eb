"""End to end: YAML -> MoE folder that transformers loads, with the right tensors in the right places."""

from __future__ import annotations

import json

import pytest
import torch
from moe_helpers import expert_config, load, logits
from safetensors.torch import load_file

from mergesmith.cli import main
from mergesmith.core.errors import MergeError
from mergesmith.moe import build_moe


def _tensors(folder) -> dict[str, torch.Tensor]:
    out = {}
    for f in folder.glob("*.safetensors"):
        out.update(load_file(f))
    return out


@pytest.fixture(scope="module")
def mixtral(llama_models, tmp_path_factory):
    out = tmp_path_factory.mktemp("mixtral") / "moe"
    experts = [llama_models[k] for k in ("e0", "e1", "e2")]
    build_moe(expert_config(llama_models["base"], experts), out, quiet=True)
    return out


def test_mixtral_loads_and_runs(mixtral):
    model = load(mixtral)
    assert type(model).__name__ == "MixtralForCausalLM"
    assert model.config.num_local_experts == 3 and model.config.num_experts_per_tok == 2
    out = logits(model)
    assert out.shape == (2, 7, model.config.vocab_size) and torch.isfinite(out).all()


def test_experts_attention_and_routers_are_where_transformers_expects(mixtral, llama_models):
    out = _tensors(mixtral)
    base = load_file(llama_models["base"] / "model.safetensors")
    e1 = load_file(llama_models["e1"] / "model.safetensors")
    prefix = "model.layers.1.block_sparse_moe"
    assert torch.equal(out[f"{prefix}.experts.1.w1.weight"], e1["model.layers.1.mlp.gate_proj.weight"])
    assert torch.equal(out[f"{prefix}.experts.1.w3.weight"], e1["model.layers.1.mlp.up_proj.weight"])
    assert torch.equal(out[f"{prefix}.experts.1.w2.weight"], e1["model.layers.1.mlp.down_proj.weight"])
    assert torch.equal(
        out["model.layers.1.self_attn.q_proj.weight"], base["model.layers.1.self_attn.q_proj.weight"]
    )
    assert torch.equal(out["lm_head.weight"], base["lm_head.weight"])
    router = out[f"{prefix}.gate.weight"]
    assert router.shape == (3, 32)
    assert torch.allclose(router.norm(dim=1), torch.ones(3), atol=1e-5)  # hidden rows are unit vectors
    model = load(mixtral)
    fused = model.model.layers[1].mlp.experts.gate_up_proj[1]
    assert torch.equal(fused[:64], e1["model.layers.1.mlp.gate_proj.weight"])  # gate rows, then up rows
    assert torch.equal(fused[64:], e1["model.layers.1.mlp.up_proj.weight"])


def test_metadata_tokenizer_and_card(mixtral, llama_models):
    cfg = json.loads((mixtral / "config.json").read_text())
    assert cfg["model_type"] == "mixtral" and cfg["architectures"] == ["MixtralForCausalLM"]
    assert cfg["num_local_experts"] == 3
    assert (mixtral / "tokenizer.json").is_file() and (mixtral / "mergesmith_moe_config.yml").is_file()
    card = (mixtral / "README.md").read_text()
    assert "gate_mode: hidden" in card and f"`{llama_models['e2'].name}`" in card and "Mixtral" in card
    assert str(llama_models["e2"]) not in card
    assert not list(mixtral.parent.glob(".*partial"))


def test_fused_layout_computes_the_same(llama_models, tmp_path):
    cfg = expert_config(llama_models["base"], [llama_models[k] for k in ("e0", "e1", "e2")])
    cfg["experts"][1]["noise_scale"] = 0.01  # the noise too is the same in both layouts
    cfg["experts"][2]["residual_scale"] = 0.5
    build_moe(cfg, tmp_path / "fused", quiet=True, fused_experts=True)
    build_moe(cfg, tmp_path / "split", quiet=True)
    assert "model.layers.0.mlp.experts.gate_up_proj" in _tensors(tmp_path / "fused")
    assert torch.equal(logits(tmp_path / "fused"), logits(tmp_path / "split"))


def test_a_residual_scale_that_overflows_the_dtype_writes_nothing(llama_models, tmp_path):
    """1e300 is finite, but the scaled down projection is not (it was written as inf, exit 0)."""
    cfg = expert_config(llama_models["base"], [llama_models["e0"], llama_models["e1"]])
    cfg["experts"][0]["residual_scale"] = 1e300
    with pytest.raises(MergeError, match="not finite .* residual_scale 1e[+]300"):
        build_moe(cfg, tmp_path / "out", quiet=True)
    assert not (tmp_path / "out").exists()


def test_noise_and_residual_scale(llama_models, tmp_path):
    cfg = expert_config(llama_models["base"], [llama_models["e0"], llama_models["e1"]])
    cfg["experts"][0]["residual_scale"] = 0.5
    cfg["experts"][1]["noise_scale"] = 0.01
    build_moe(cfg, tmp_path / "a", quiet=True)
    build_moe(cfg, tmp_path / "b", quiet=True)
    out, again = _tensors(tmp_path / "a"), _tensors(tmp_path / "b")
    e0 = load_file(llama_models["e0"] / "model.safetensors")
    e1 = load_file(llama_models["e1"] / "model.safetensors")
    p = "model.layers.0.block_sparse_moe.experts"
    assert torch.allclose(out[f"{p}.0.w2.weight"], 0.5 * e0["model.layers.0.mlp.down_proj.weight"])
    assert torch.equal(out[f"{p}.0.w1.weight"], e0["model.layers.0.mlp.gate_proj.weight"])
    noise = out[f"{p}.1.w1.weight"] - e1["model.layers.0.mlp.gate_proj.weight"]
    assert 0.005 < noise.std() < 0.02
    assert torch.equal(out[f"{p}.1.w1.weight"], again[f"{p}.1.w1.weight"])  # seeded


@pytest.mark.parametrize("mode", ["random", "uniform_random"])
def test_random_routers_are_seeded(llama_models, tmp_path, mode):
    cfg = {
        "base_model": str(llama_models["base"]),
        "gate_mode": mode,
        "experts": [{"source_model": str(llama_models[k])} for k in ("e0", "e1")],
    }
    name = "model.layers.1.block_sparse_moe.gate.weight"
    for seed, folder in [(0, "a"), (0, "b"), (1, "c")]:
        build_moe(cfg, tmp_path / folder, quiet=True, random_seed=seed)
    a, b, c = (_tensors(tmp_path / f)[name] for f in "abc")
    assert torch.equal(a, b) and not torch.equal(a, c)
    if mode == "uniform_random":
        assert a.abs().max() <= 32**-0.5
    assert torch.isfinite(logits(tmp_path / "a")).all()


def test_cheap_embed_uses_one_vector_for_every_layer(llama_models, tmp_path):
    cfg = expert_config(llama_models["base"], [llama_models["e0"], llama_models["e1"]], "cheap_embed")
    build_moe(cfg, tmp_path / "out", quiet=True)
    t = _tensors(tmp_path / "out")
    r0, r1 = (t[f"model.layers.{i}.block_sparse_moe.gate.weight"] for i in (0, 1))
    assert torch.equal(r0, r1) and torch.allclose(r0.norm(dim=1), torch.ones(2), atol=1e-5)


def test_bf16_output(llama_models, tmp_path):
    cfg = expert_config(
        llama_models["base"], [llama_models["e0"], llama_models["e1"]], "random", dtype="bfloat16"
    )
    build_moe(cfg, tmp_path / "out", quiet=True)
    assert {t.dtype for t in _tensors(tmp_path / "out").values()} == {torch.bfloat16}
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == "bfloat16"


def test_sharded_output(llama_models, tmp_path):
    cfg = expert_config(llama_models["base"], [llama_models["e0"], llama_models["e1"]], "random")
    build_moe(cfg, tmp_path / "out", quiet=True, out_shard_size="40K")
    assert (tmp_path / "out" / "model.safetensors.index.json").is_file()
    assert torch.isfinite(logits(tmp_path / "out")).all()


def test_cli_builds(llama_models, tmp_path, capsys):
    import yaml

    path = tmp_path / "moe.yml"
    path.write_text(
        yaml.safe_dump(
            expert_config(llama_models["base"], [llama_models["e0"], llama_models["e1"]], "calibrated")
        )
    )
    assert main(["moe", str(path), str(tmp_path / "out")]) == 0
    err = capsys.readouterr().err
    assert "wrote a Mixtral model with 2 experts" in err and "routing accuracy on prompt tokens" in err
    assert main(["moe", str(path), str(tmp_path / "out")]) == 2  # exists
    assert "--overwrite" in capsys.readouterr().err


# --- errors -------------------------------------------------------------------------------------------


def _error(cfg: dict, tmp_path, **kw) -> str:
    with pytest.raises(MergeError) as info:
        build_moe(cfg, tmp_path / "out", quiet=True, **kw)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))
    return str(info.value)


def test_experts_of_another_architecture(llama_models, dense_factory, tmp_path):
    mistral = dense_factory(tmp_path / "mistral", "mistral")
    cfg = expert_config(llama_models["base"], [llama_models["e0"], mistral], "random")
    msg = _error(cfg, tmp_path)
    assert "expert 1" in msg and "'mistral' model" in msg and "'llama'" in msg


def test_experts_of_another_shape(llama_models, dense_factory, tmp_path):
    wide = dense_factory(tmp_path / "wide", intermediate=48)
    msg = _error(expert_config(llama_models["base"], [llama_models["e0"], wide], "random"), tmp_path)
    assert "expert 1" in msg and "mlp.gate_proj.weight" in msg and "[48, 32]" in msg and "[64, 32]" in msg


def test_experts_with_another_layer_count(llama_models, dense_factory, tmp_path):
    deep = dense_factory(tmp_path / "deep", layers=3)
    assert "has 3 layers but the base model has 2" in _error(
        expert_config(llama_models["base"], [llama_models["e0"], deep], "random"), tmp_path
    )


def test_architecture_that_cannot_take_the_inputs(llama_models, tmp_path):
    cfg = expert_config(
        llama_models["base"], [llama_models["e0"], llama_models["e1"]], "random", architecture="qwen3"
    )
    assert "cannot build an MoE from 'llama' models" in _error(cfg, tmp_path)
    cfg["architecture"] = "gemma"
    assert "names no MoE output family" in _error(cfg, tmp_path)


def test_shared_expert_needs_a_family_that_has_one(llama_models, tmp_path):
    cfg = expert_config(
        llama_models["base"], [llama_models["e0"], llama_models["e1"]], "random", architecture="mixtral"
    )
    cfg["shared_experts"] = [{"source_model": str(llama_models["e2"])}]
    assert "Mixtral has no shared expert" in _error(cfg, tmp_path)


def test_missing_model(llama_models, tmp_path):
    cfg = expert_config(llama_models["base"], [llama_models["e0"], tmp_path / "nope"], "random")
    assert "folder not found" in _error(cfg, tmp_path)


def test_calibration_target_must_beat_a_flat_router(llama_models, tmp_path):
    cfg = expert_config(llama_models["base"], [llama_models[k] for k in ("e0", "e1", "e2")], "calibrated")
    cfg["calibration"] = {"target_top1": 0.3}
    assert "not above 1/3" in _error(cfg, tmp_path)


def test_prompt_modes_need_the_base_tokenizer(llama_models, tmp_path):
    import shutil

    base = tmp_path / "no-tokenizer"
    shutil.copytree(llama_models["base"], base)
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (base / f).unlink(missing_ok=True)
    (base / "tokenizer_config.json").write_text('{"model_max_length": 64}')
    for mode in ("hidden", "cheap_embed"):
        msg = _error(expert_config(base, [llama_models["e0"], llama_models["e1"]], mode), tmp_path)
        assert "cannot load its tokenizer" in msg and "gate_mode: random" in msg


def test_lora_expert_references(llama_models, tmp_path):
    """An expert may be MODEL+ADAPTER (as in mergekit-moe): its MLPs are read with the adapter applied."""
    peft = pytest.importorskip("peft")
    import transformers

    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_pretrained(llama_models["base"])
    lora = peft.LoraConfig(init_lora_weights=False, r=4, target_modules=["gate_proj", "up_proj", "down_proj"])
    peft.get_peft_model(model, lora).save_pretrained(tmp_path / "adapter")
    merged = peft.PeftModel.from_pretrained(
        transformers.AutoModelForCausalLM.from_pretrained(llama_models["base"]), tmp_path / "adapter"
    ).merge_and_unload()
    ref = f"{llama_models['base']}+{tmp_path / 'adapter'}"
    cfg = expert_config(llama_models["base"], [llama_models["e0"], llama_models["base"]], "random")
    cfg["experts"][1]["source_model"] = ref
    out = _tensors(build_moe(cfg, tmp_path / "moe", quiet=True).path)
    got = out["model.layers.1.block_sparse_moe.experts.1.w2.weight"]
    assert torch.allclose(got, merged.model.layers[1].mlp.down_proj.weight, atol=1e-6)
    cfg["base_model"] = ref
    assert "must be a model folder" in _error(cfg, tmp_path)
