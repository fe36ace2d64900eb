"""DeepSeek-V3, GLM4-MoE, GraniteMoE and GraniteMoeShared outputs (and the refused OLMoE and PhiMoE).

For each: the folder loads with no missing or unexpected keys (``load``), identical experts give the dense
model's logits, and the router logits transformers reads back are the ones mergesmith computed. DeepSeek-V3
and GLM4-MoE weigh the top-k by renormalised sigmoids; mergesmith shifts calibrated logits (along the
fit's bias direction) so that those weights are the softmax ones (gates.shift_for_sigmoid).
"""

from __future__ import annotations

import pytest
import torch
from moe_helpers import expert_config, load, logits

from mergesmith.core.errors import MergeError
from mergesmith.moe import build_moe
from mergesmith.moe.activations import BaseRunner

CASES = [  # dense family -> output class (architecture: key), shared expert or not
    ("deepseek_v3", "DeepseekV3ForCausalLM", "deepseek_v3", False),
    ("deepseek_v3", "DeepseekV3ForCausalLM", "deepseek", True),
    ("glm4_moe", "Glm4MoeForCausalLM", "glm4_moe", False),
    ("glm4_moe", "Glm4MoeForCausalLM", "glm4", True),
    ("granite", "GraniteMoeForCausalLM", "granitemoe", False),
    ("granite", "GraniteMoeSharedForCausalLM", "granitemoeshared", True),
]


@pytest.fixture(scope="module")
def dense(tmp_path_factory, dense_factory):
    root = tmp_path_factory.mktemp("dense")
    return {f: dense_factory(root / f, f) for f in {c[0] for c in CASES}}


def _config(base, mode: str, architecture: str, shared: bool) -> dict:
    cfg = expert_config(base, [base] * 3, mode, architecture=architecture)
    if shared:  # the base's own MLP, silenced: the model stays the dense one
        cfg["shared_experts"] = [{"source_model": str(base), "residual_scale": 0.0}]
    return cfg


@pytest.mark.parametrize(("family", "cls", "key", "shared"), CASES)
@pytest.mark.parametrize("mode", ["calibrated", "random"])
def test_identical_experts_are_the_dense_model(dense, tmp_path, family, cls, key, shared, mode):
    base = dense[family]
    model = load(build_moe(_config(base, mode, key, shared), tmp_path / "moe", quiet=True).path)
    assert type(model).__name__ == cls
    torch.testing.assert_close(logits(model), logits(load(base)), atol=1e-5, rtol=1e-5)


def _router_inputs(base, texts: list[str]) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Each layer's feed-forward input [N, d] for the texts' tokens in the dense model, and their ids."""
    run = BaseRunner.load(base, "base")
    ids = torch.tensor([run.tokenizer(t)["input_ids"] for t in texts])
    captured: list[torch.Tensor] = []
    layers = run.model.model.layers
    hooks = [layer.mlp.register_forward_pre_hook(lambda m, a: captured.append(a[0])) for layer in layers]
    with torch.no_grad():
        run.model(input_ids=ids)
    for h in hooks:
        h.remove()
    return [x.reshape(-1, x.shape[-1]).float() for x in captured], ids


def _topk_weights(logits: torch.Tensor, index: torch.Tensor, sigmoid: bool) -> torch.Tensor:
    w = logits.sigmoid().gather(1, index) if sigmoid else logits.softmax(-1).gather(1, index)
    return w / w.sum(-1, keepdim=True)


@pytest.mark.parametrize(("family", "cls", "key", "shared"), CASES)
def test_router_logits_read_back_are_mergesmiths(dense, tmp_path, family, cls, key, shared):
    """With identical experts every layer's router input is the dense model's. transformers' router logits
    must be the written router times that input, pick the calibrated router's top-k, and (sigmoid-gated
    families) weigh it closer to the calibrated softmax weights than the unshifted logits would."""
    from safetensors.torch import load_file

    base = dense[family]
    cfg = _config(base, "calibrated", key, shared)
    result = build_moe(cfg, tmp_path / "moe", quiet=True)
    model = load(result.path)
    texts = [p for e in cfg["experts"] for p in e["positive_prompts"] if len(p) == 6]  # calibration prompts
    xs, ids = _router_inputs(base, texts)
    with torch.no_grad():
        read = model(input_ids=ids, output_router_logits=True).router_logits
    written = load_file(result.path / "model.safetensors")
    sigmoid = family in ("deepseek_v3", "glm4_moe")
    assert len(read) == len(xs) == len(result.reports)
    for layer, (got, x) in enumerate(zip(read, xs)):
        prefix = f"model.layers.{layer}."
        w = next(
            v
            for k, v in written.items()
            if k.startswith(prefix) and k.endswith(("gate.weight", "router.layer.weight"))
        )
        got = got.reshape(len(x), -1).float()
        torch.testing.assert_close(got, x @ w.float().T, atol=1e-4, rtol=1e-4)  # the router mergesmith wrote
        ours = x @ result.reports[layer].calibrated.weight.T  # the calibrated router, before any shift
        top = torch.topk(ours, 2, dim=-1).indices
        assert torch.equal(torch.topk(got, 2, dim=-1).indices.sort(-1).values, top.sort(-1).values)
        want = _topk_weights(ours, top, sigmoid=False)
        if sigmoid:
            shifted = (_topk_weights(got, top, True) - want).abs().mean()
            plain = (_topk_weights(ours, top, True) - want).abs().mean()
            assert shifted < plain, (shifted, plain)
        else:
            torch.testing.assert_close(_topk_weights(got, top, False), want, atol=1e-5, rtol=1e-4)


def test_granite_shared_expert_is_stacked_gate_then_up(dense, expert_factory, tmp_path):
    base = dense["granite"]
    shared = expert_factory(base, tmp_path / "shared", seed=5)
    cfg = expert_config(base, [expert_factory(base, tmp_path / f"e{i}", seed=i) for i in range(2)], "random")
    cfg["shared_experts"] = [{"source_model": str(shared), "residual_scale": 0.5}]
    model = load(build_moe(cfg, tmp_path / "moe", quiet=True).path)
    mlp = load(shared).model.layers[1].mlp
    got = model.model.layers[1].shared_mlp
    assert torch.equal(got.input_linear.weight, torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]))
    assert torch.equal(got.output_linear.weight, 0.5 * mlp.down_proj.weight)
    experts = model.model.layers[1].block_sparse_moe.experts
    e1 = load(tmp_path / "e1").model.layers[1].mlp
    torch.testing.assert_close(experts.gate_up_proj[1], torch.cat([e1.gate_proj.weight, e1.up_proj.weight]))


def test_deepseek_shared_expert_must_be_whole_experts_wide(dense_factory, tmp_path):
    base = dense_factory(tmp_path / "ds", "deepseek_v3")
    narrow = dense_factory(tmp_path / "narrow", "deepseek_v3", intermediate=48)
    cfg = expert_config(base, [base] * 2, "random")
    cfg["shared_experts"] = [{"source_model": str(narrow)}]
    with pytest.raises(MergeError) as err:
        build_moe(cfg, tmp_path / "moe", quiet=True)
    assert "whole number of routed experts wide (64)" in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "moe").exists()


@pytest.mark.parametrize(
    ("architecture", "words"),
    [
        ("olmoe", "does not write OLMoE MoEs: no dense transformers family"),
        ("phimoe", "does not write PhiMoE"),
    ],
)
def test_refused_families_are_one_line_errors(llama_models, tmp_path, architecture, words):
    cfg = expert_config(
        llama_models["base"], [llama_models["e0"], llama_models["e1"]], "random", architecture=architecture
    )
    with pytest.raises(MergeError) as err:
        build_moe(cfg, tmp_path / "moe", quiet=True)
    assert words in str(err.value) and "\n" not in str(err.value)


def test_llama_experts_cannot_be_deepseek(llama_models, tmp_path):
    cfg = expert_config(
        llama_models["base"], [llama_models["e0"]], "random", architecture="deepseek", experts_per_token=1
    )
    with pytest.raises(MergeError) as err:
        build_moe(cfg, tmp_path / "moe", quiet=True)
    assert "cannot build an MoE from 'llama' models; supported inputs: DeepSeek-V3 from deepseek_v3" in str(
        err.value
    )


@pytest.mark.parametrize(("family", "key"), [("deepseek_v3", "deepseek"), ("granite", "granitemoe")])
def test_fused_layout_is_the_dense_model_too(dense, tmp_path, family, key):
    """--fused-experts writes transformers 5's in-memory names (``...experts.gate_up_proj``, the in-memory
    router name), which transformers loads as they are."""
    base = dense[family]
    cfg = _config(base, "random", key, False)
    model = load(build_moe(cfg, tmp_path / "moe", quiet=True, fused_experts=True).path)
    torch.testing.assert_close(logits(model), logits(load(base)), atol=1e-5, rtol=1e-5)


def test_no_shared_expert_prints_no_torch_warning(dense, tmp_path):
    """DeepSeek-V3 without a shared expert has zero-size Linear layers; building the expected tensors
    printed torch's 'Initializing zero-element tensors is a no-op' on the user's terminal."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        build_moe(_config(dense["deepseek_v3"], "random", "deepseek", False), tmp_path / "moe", quiet=True)
