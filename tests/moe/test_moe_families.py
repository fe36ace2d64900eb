"""Each output family loads in transformers; with every expert equal to the base, the MoE is the dense model.

Why the identity holds: the sparse block computes sum_{e in top-k} w_e MLP_e(x). Mixtral always divides
the top-k probabilities by their sum (so sum w_e = 1), and mergesmith writes Qwen MoE / Qwen3 MoE configs
with norm_topk_prob = true, so with MLP_e = MLP the block is exactly MLP(x), whatever the router says.
Qwen MoE adds sigmoid(g.x) * shared(x); a shared expert with residual_scale 0 (or none at all, which
writes a zero expert) adds exactly 0.
"""

from __future__ import annotations

import json

import pytest
import torch
from moe_helpers import expert_config, load, logits

from mergesmith.moe import build_moe


def _identity_config(base, mode="hidden", n=3, **extra) -> dict:
    return expert_config(base, [base] * n, mode, **extra)


@pytest.mark.parametrize("mode", ["hidden", "calibrated", "random"])
def test_mixtral_of_identical_experts_is_the_dense_model(llama_models, tmp_path, mode):
    out = build_moe(_identity_config(llama_models["base"], mode), tmp_path / "moe", quiet=True).path
    dense = logits(load(llama_models["base"]))
    assert torch.allclose(logits(out), dense, atol=1e-5, rtol=1e-5)


def test_identical_experts_warn(llama_models, tmp_path, caplog):
    build_moe(_identity_config(llama_models["base"], "random"), tmp_path / "moe", quiet=True)
    assert any("all 3 experts are the same model" in r.message for r in caplog.records)


def test_tied_embeddings(dense_factory, tmp_path):
    base = dense_factory(tmp_path / "tied", tied=True)
    out = build_moe(_identity_config(base, "hidden", n=2), tmp_path / "moe", quiet=True).path
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["tie_word_embeddings"] is True
    model = load(out)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert torch.allclose(logits(model), logits(load(base)), atol=1e-5)


def test_qwen2_moe_with_a_silenced_shared_expert_is_the_dense_model(dense_factory, tmp_path):
    base = dense_factory(tmp_path / "qwen2", "qwen2", tied=True)
    cfg = _identity_config(base)
    cfg["shared_experts"] = [{"source_model": str(base), "residual_scale": 0.0, "positive_prompts": ["zzz"]}]
    out = build_moe(cfg, tmp_path / "moe", quiet=True).path
    model = load(out)
    assert type(model).__name__ == "Qwen2MoeForCausalLM"
    assert model.config.norm_topk_prob and model.config.qkv_bias and model.config.num_experts == 3
    assert torch.allclose(logits(model), logits(load(base)), atol=1e-5)


def test_qwen2_moe_shared_expert_is_its_model_mlp(dense_factory, expert_factory, tmp_path):
    base = dense_factory(tmp_path / "qwen2", "qwen2")
    shared = expert_factory(base, tmp_path / "shared", seed=5)
    cfg = expert_config(base, [expert_factory(base, tmp_path / f"e{i}", seed=i) for i in range(2)], "hidden")
    cfg["shared_experts"] = [
        {"source_model": str(shared), "residual_scale": 0.25, "positive_prompts": ["abc"]}
    ]
    model = load(build_moe(cfg, tmp_path / "moe", quiet=True).path)
    dense = load(shared)
    got = model.model.layers[1].mlp.shared_expert.down_proj.weight
    assert torch.allclose(got, 0.25 * dense.model.layers[1].mlp.down_proj.weight)
    assert torch.isfinite(logits(model)).all()


def test_qwen2_moe_without_shared_expert_writes_a_zero_one(dense_factory, tmp_path):
    base = dense_factory(tmp_path / "qwen2", "qwen2")
    out = build_moe(_identity_config(base, "random", n=2), tmp_path / "moe", quiet=True).path
    model = load(out)
    assert model.config.shared_expert_intermediate_size == 1
    assert torch.allclose(logits(model), logits(load(base)), atol=1e-5)


def test_llama_experts_as_qwen_moe(llama_models, tmp_path):
    cfg = _identity_config(llama_models["base"], "random", n=2, architecture="qwen")
    model = load(build_moe(cfg, tmp_path / "moe", quiet=True).path)
    assert type(model).__name__ == "Qwen2MoeForCausalLM" and not model.config.qkv_bias
    assert torch.allclose(logits(model), logits(load(llama_models["base"])), atol=1e-5)


def test_qwen3_moe_is_the_dense_model(dense_factory, tmp_path):
    base = dense_factory(tmp_path / "qwen3", "qwen3")
    model = load(build_moe(_identity_config(base, "calibrated", n=2), tmp_path / "moe", quiet=True).path)
    assert type(model).__name__ == "Qwen3MoeForCausalLM"
    assert torch.allclose(logits(model), logits(load(base)), atol=1e-5)


def test_mistral_experts_keep_the_sliding_window(dense_factory, tmp_path):
    base = dense_factory(tmp_path / "mistral", "mistral")
    cfg_path = base / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["sliding_window"] = 4
    cfg_path.write_text(json.dumps(cfg))
    model = load(build_moe(_identity_config(base, "random", n=2), tmp_path / "moe", quiet=True).path)
    assert model.config.sliding_window == 4
    ids = torch.tensor([[1, *range(5, 17)]])
    assert torch.allclose(logits(model, ids), logits(load(base), ids), atol=1e-5)


def test_flex_olmo_from_olmo2_is_the_dense_model(dense_factory, tmp_path):
    """FlexOlmo is OLMo 2's layout (post-norms, full-width q/k norms) with a sparse block."""
    base = dense_factory(tmp_path / "olmo2", "olmo2")
    model = load(build_moe(_identity_config(base, "calibrated", n=2), tmp_path / "moe", quiet=True).path)
    assert type(model).__name__ == "FlexOlmoForCausalLM" and model.config.norm_topk_prob
    assert torch.allclose(logits(model), logits(load(base)), atol=1e-5)
