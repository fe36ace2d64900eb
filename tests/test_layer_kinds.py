"""Models whose layers are not all alike, and models with more than one layer stack: merges of tiny models of
real transformers families (dense-then-MoE, attention/Mamba hybrids, vision-language models, Gemma 4's
per-layer config, a 2-layer model with lists of length 2), and the rewrite of per-layer config fields."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

import mergesmith
from mergesmith.core.arch import Layout
from mergesmith.core.errors import MergeError
from mergesmith.core.layer_config import rewrite_layer_fields
from tiny_models import layer_kinds_config, layer_kinds_model, perturb

FAMILIES = ("deepseek_v3", "jamba", "bamba", "qwen3_next", "falcon_h1", "gemma4", "llava", "smolvlm")
# the decoder's prefix and the layer-count key of each family
# (llava is saved in its original checkpoint names)
DECODER = {"llava": "language_model.model.layers", "smolvlm": "model.text_model.layers"}
COUNT_KEY = {"llava": ("text_config", "num_hidden_layers"), "smolvlm": ("text_config", "num_hidden_layers")}


@pytest.fixture(scope="module")
def trios(tmp_path_factory) -> dict[str, tuple[Path, Path, Path]]:
    root = tmp_path_factory.mktemp("kinds")
    out = {}
    for family in FAMILIES:
        base = layer_kinds_model(root / f"{family}-base", family)
        out[family] = (
            base,
            perturb(base, root / f"{family}-ft1", 0.1, seed=1),
            perturb(base, root / f"{family}-ft2", 0.1, seed=2),
        )
    return out


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def config_of(folder: Path) -> dict:
    return json.loads((folder / "config.json").read_text())


def passthrough(tmp_path: Path, model: Path, ranges, name: str = "pt") -> Path:
    cfg = {
        "merge_method": "passthrough",
        "slices": [{"sources": [{"model": str(model), "layer_range": list(r)}]} for r in ranges],
    }
    return mergesmith.merge(cfg, tmp_path / name, quiet=True)


def load(folder: Path, family: str):
    """The output loaded with transformers: no missing or unexpected keys, finite logits on a few tokens."""
    import transformers

    auto = layer_kinds_config(family)[1]
    model, info = getattr(transformers, auto).from_pretrained(folder, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([[3, 5, 7, 9]])).logits
    assert torch.isfinite(logits).all()
    return model


@pytest.mark.parametrize("family", FAMILIES)
def test_linear_is_the_mean_and_ties_runs(tmp_path, trios, family):
    base, ft1, ft2 = trios[family]
    cfg = {
        "merge_method": "linear",
        "models": [{"model": str(m), "parameters": {"weight": 0.5}} for m in (ft1, ft2)],
        "dtype": "float32",
    }
    out = tensors(mergesmith.merge(cfg, tmp_path / "linear", quiet=True))
    a, b = tensors(ft1), tensors(ft2)
    assert out.keys() == a.keys()
    for name, t in out.items():
        if t.is_floating_point():
            torch.testing.assert_close(t, (a[name] + b[name]) / 2, rtol=1e-6, atol=1e-6, msg=name)
        else:
            assert torch.equal(t, a[name])
    ties = {
        "merge_method": "ties",
        "base_model": str(base),
        "models": [{"model": str(m), "parameters": {"weight": 1.0, "density": 0.5}} for m in (ft1, ft2)],
    }
    merged = mergesmith.merge(ties, tmp_path / "ties", quiet=True)
    out = tensors(merged)
    assert out.keys() == a.keys()
    assert all(torch.isfinite(t.float()).all() for t in out.values())
    load(merged, family)


SELF_MERGE_REFUSED = {"jamba": "attn_layer_period"}  # attention placed by period/offset: [0,1,1] breaks it


@pytest.mark.parametrize("family", FAMILIES)
def test_passthrough_self_merge_loads(tmp_path, trios, family):
    base = trios[family][0]
    if family in SELF_MERGE_REFUSED:
        with pytest.raises(MergeError, match=SELF_MERGE_REFUSED[family]):
            passthrough(tmp_path, base, [(0, 2), (1, 2)])
        return
    out = passthrough(tmp_path, base, [(0, 2), (1, 2)])
    load(out, family)
    prefix = DECODER.get(family, "model.layers")
    src, dst = tensors(base), tensors(out)
    for i, s in enumerate([0, 1, 1]):  # every output layer is its source layer, with exactly its tensors
        want = {k[len(f"{prefix}.{s}.") :] for k in src if k.startswith(f"{prefix}.{s}.")}
        got = {k[len(f"{prefix}.{i}.") :] for k in dst if k.startswith(f"{prefix}.{i}.")}
        assert got == want
        for suffix in want:
            assert torch.equal(dst[f"{prefix}.{i}.{suffix}"], src[f"{prefix}.{s}.{suffix}"])
    outside = [k for k in src if not k.startswith(prefix + ".")]
    assert all(torch.equal(dst[k], src[k]) for k in outside)  # towers, embeddings, norms: unchanged
    where, key = COUNT_KEY.get(family, (None, "num_hidden_layers"))
    cfg = config_of(out)
    assert (cfg[where] if where else cfg)[key] == 3


def test_dense_then_moe(tmp_path, trios):
    base = trios["deepseek_v3"][0]
    # two dense layers, then the MoE ones: first_k_dense_replace is refitted to 2
    out = passthrough(tmp_path, base, [(0, 1), (0, 3)])
    assert config_of(out)["first_k_dense_replace"] == 2
    assert config_of(out)["num_hidden_layers"] == 4
    load(out, "deepseek_v3")
    # an MoE layer before the dense one cannot be described by first_k_dense_replace
    with pytest.raises(MergeError, match="first_k_dense_replace"):
        passthrough(tmp_path, base, [(1, 2), (0, 3)], "bad")


def test_slice_pairing_layers_of_different_kinds(tmp_path, trios):
    base, ft1, _ = trios["deepseek_v3"]
    cfg = {
        "merge_method": "linear",
        "slices": [
            {
                "sources": [
                    {"model": str(base), "layer_range": [0, 1], "parameters": {"weight": 1.0}},
                    {"model": str(ft1), "layer_range": [1, 2], "parameters": {"weight": 1.0}},
                ]
            }
        ],
    }
    with pytest.raises(
        MergeError, match=r"has no tensor 'model\.layers\.1\.mlp\.\w+.*pairs layers of different"
    ):
        mergesmith.merge(cfg, tmp_path / "out", quiet=True)


def test_jamba_keeps_its_period(tmp_path, trios):
    base = trios["jamba"][0]
    out = passthrough(tmp_path, base, [(0, 2), (0, 2), (2, 4)])  # every layer keeps its kind's position
    assert config_of(out)["num_hidden_layers"] == 6
    load(out, "jamba")


def test_hybrid_layer_lists_follow_their_layers(tmp_path, trios):
    out = passthrough(tmp_path, trios["bamba"][0], [(1, 3), (0, 2)])  # source layers 1, 2, 0, 1
    assert config_of(out)["attn_layer_indices"] == [0, 3]
    load(out, "bamba")
    out = passthrough(tmp_path, trios["qwen3_next"][0], [(3, 4), (0, 4)], "q")
    assert config_of(out)["layer_types"] == ["full_attention"] + ["linear_attention", "full_attention"] * 2
    load(out, "qwen3_next")


def test_gemma4_per_layer_config(tmp_path, trios):
    base = trios["gemma4"][0]
    assert set(config_of(base)["per_layer_config"]) == {"1", "2"}  # head_dim 16 on the full-attention layers
    out = passthrough(tmp_path, base, [(0, 1), (0, 3)])  # source layers 0, 0, 1, 2
    cfg = config_of(out)
    assert cfg["layer_types"] == ["sliding_attention"] * 2 + ["full_attention"] * 2
    assert set(cfg["per_layer_config"]) == {"2", "3"}
    load(out, "gemma4")


def test_two_layer_lists_are_not_per_layer(tmp_path, trios):
    base = trios["falcon_h1"][0]
    out = passthrough(tmp_path, base, [(0, 2), (1, 2)])
    cfg, src = config_of(out), config_of(base)
    assert cfg["mlp_multipliers"] == src["mlp_multipliers"] == [0.5, 2.0]
    assert cfg["num_hidden_layers"] == 3


@pytest.mark.parametrize(("family", "tower", "depth"), [("llava", "vision_tower.encoder.layers", 3)])
def test_tower_gradient_position(trios, family, tower, depth):
    """A tower layer's gradient position is its position in its own tower; the decoder's, in the decoder."""
    _, ft1, ft2 = trios[family]
    cfg = {
        "merge_method": "linear",
        "models": [
            {"model": str(ft1), "parameters": {"weight": [0.0, 1.0]}},
            {"model": str(ft2), "parameters": {"weight": 1.0}},
        ],
    }
    plan = mergesmith.make_plan(cfg)
    try:
        weights = {t.name: dict(t.params)["weight"][0] for t in plan.tensors}
    finally:
        plan.close()
    assert [weights[f"{tower}.{i}.mlp.fc1.weight"] for i in range(depth)] == [0.0, 0.5, 1.0]
    assert [weights[f"language_model.model.layers.{i}.mlp.up_proj.weight"] for i in range(2)] == [0.0, 1.0]
    assert weights["multi_modal_projector.linear_1.weight"] == 0.0


def test_integer_tensors_pass_through_whatever_the_dtype(tmp_path, trios):
    base, ft1, ft2 = trios["bamba"]
    root = tmp_path / "int"
    models = []
    for i, m in enumerate((ft1, ft2)):
        folder = perturb(m, root / f"m{i}", 0.0, seed=0)
        f = next(folder.glob("*.safetensors"))
        t = load_file(f)
        t["model.layers.0.mlp.tid2eid"] = torch.arange(12, dtype=torch.int64).reshape(3, 4) + i
        save_file(t, f, metadata={"format": "pt"})
        models.append(folder)
    cfg = {
        "merge_method": "linear",
        "models": [{"model": str(m), "parameters": {"weight": 0.5}} for m in models],
        "dtype": "bfloat16",
    }
    out = tensors(mergesmith.merge(cfg, tmp_path / "out", quiet=True))
    table = out["model.layers.0.mlp.tid2eid"]
    assert table.dtype == torch.int64
    assert torch.equal(table, torch.arange(12).reshape(3, 4))  # the first model's, as stored
    assert out["model.embed_tokens.weight"].dtype == torch.bfloat16


# Layout: stacks and the decoder, from names and config.json alone


def names_of(stacks: dict[str, tuple[int, list[str]]], extra=()) -> list[str]:
    return [f"{p}.{i}.{s}" for p, (n, suffixes) in stacks.items() for i in range(n) for s in suffixes] + list(
        extra
    )


def test_decoder_is_the_stack_the_config_counts():
    names = names_of(
        {"model.vision.layers": (4, ["fc.weight"]), "model.text.layers": (2, ["mlp.weight"])},
        ["model.text.embed_tokens.weight", "model.text.norm.weight", "model.vision.post_norm.weight"],
    )
    lay = Layout.infer("m", names, {"text_config": {"num_hidden_layers": 2}})
    assert lay.decoder.prefix == "model.text.layers" and lay.layer_key == "text_config.num_hidden_layers"
    assert [t.prefix for t in lay.towers] == ["model.vision.layers"]
    assert lay.post == ("model.text.norm.weight",)  # the tower's own norm stays on the input side
    assert "model.vision.post_norm.weight" in lay.pre
    assert lay.position("model.vision.layers.3.fc.weight") == 1.0
    with pytest.raises(
        MergeError, match=r"num_hidden_layers=3 but no layer stack.*model\.vision\.layers \(4 layers\)"
    ):
        Layout.infer("m", names, {"num_hidden_layers": 3})


def test_equal_depths_are_told_apart_by_name():
    names = names_of({"model.encoder.layers": (2, ["a.weight"]), "model.decoder.layers": (2, ["a.weight"])})
    lay = Layout.infer("m", names, {"decoder_layers": 2, "encoder_layers": 2})
    assert lay.decoder.prefix == "model.decoder.layers" and lay.layer_key == "decoder_layers"
    with pytest.raises(MergeError, match="cannot tell which stack"):
        Layout.infer(
            "m", names_of({"a.layers": (2, ["w"]), "b.layers": (2, ["w"])}), {"num_hidden_layers": 2}
        )


def test_layers_under_unknown_names_are_whole_tensors():
    """xlm keeps its layers as ``attentions.N``: no stack is found, every tensor is merged as a whole."""
    lay = Layout.infer("m", ["attentions.0.q_lin.weight", "embeddings.weight"], {"n_layers": 1})
    assert lay.decoder is None and lay.num_layers == 0
    assert lay.pre == ("embeddings.weight",) and lay.post == ("attentions.0.q_lin.weight",)


def test_layer_count_from_a_per_layer_list():
    """nemotron_h's config.json has no count key: its layers_block_type gives the count."""
    names = names_of({"backbone.layers": (3, ["norm.weight"])})
    lay = Layout.infer("m", names, {"layers_block_type": ["mamba", "attention", "mlp"]})
    assert lay.num_layers == 3 and lay.layer_key is None


def test_layers_keep_their_own_tensors():
    names = [
        "model.layers.0.mlp.up.weight",
        "model.layers.1.mlp.experts.up",
        "model.layers.1.mlp.gate.weight",
    ]
    lay = Layout.infer("m", names, {"num_hidden_layers": 2})
    assert lay.decoder.layers == (("mlp.up.weight",), ("mlp.experts.up", "mlp.gate.weight"))


# per-layer config fields

KINDS3 = [frozenset("a")] * 3


def rewrite(config: dict, source, kinds=KINDS3) -> dict:
    rewrite_layer_fields(config, "", source, kinds)
    return config


def test_field_shapes():
    cfg = rewrite(
        {
            "layer_types": ["x", "y", "z"],
            "mlp_only_layers": [0, 2],
            "ple_layer_ids": [2],  # one-based
            "per_layer_config": {"1": {"head_dim": 16}},
            "hybrid_override_pattern": "M*-",
            "no_rope_layers": [1, 0, 1, 1, 1],  # may be longer than the layers: the rest is unused
            "time_step_limit": [0.0, 1.0, 2.0],  # not per layer: its name does not say so
        },
        [2, 1, 1, 0],
    )
    assert cfg["layer_types"] == ["z", "y", "y", "x"]
    assert cfg["mlp_only_layers"] == [0, 3]
    assert cfg["ple_layer_ids"] == [2, 3]
    assert cfg["per_layer_config"] == {"1": {"head_dim": 16}, "2": {"head_dim": 16}}
    assert cfg["hybrid_override_pattern"] == "-**M"
    assert cfg["no_rope_layers"] == [1, 0, 0, 1]
    assert cfg["time_step_limit"] == [0.0, 1.0, 2.0]


@pytest.mark.parametrize(
    ("config", "field"),
    [
        ({"kv_source_layers": [0, 0, 2]}, "kv_source_layers"),
        ({"odd_layer_scales": [1.0, 2.0, 3.0]}, "odd_layer_scales"),
        ({"layer_types": ["x", "y"]}, "layer_types"),
        ({"attn_layer_period": 2, "attn_layer_offset": 1}, "attn_layer_period/attn_layer_offset"),
    ],
)
def test_fields_that_cannot_be_rewritten(config, field):
    with pytest.raises(MergeError, match=f"field {field}|field '{field}'"):
        rewrite(config, [0, 0, 1, 2])


@pytest.mark.parametrize("field", ["first_k_dense_replace", "num_dense_layers"])
def test_dense_prefix_is_refitted(field):
    kinds = [frozenset("d"), frozenset("m"), frozenset("m")]
    assert rewrite({field: 1}, [0, 0, 1, 2], kinds)[field] == 2
    with pytest.raises(MergeError, match=field):
        rewrite({field: 1}, [1, 0, 2], kinds)


def test_unexplained_kinds_are_refused():
    kinds = [frozenset("a"), frozenset("b"), frozenset("a")]
    with pytest.raises(MergeError, match="layers 0 and 1 hold different tensors"):
        rewrite({}, [1, 0, 2], kinds)
    assert rewrite({"layer_types": ["p", "q", "p"]}, [1, 0, 2], kinds)["layer_types"] == ["q", "p", "p"]
    assert rewrite({}, [0, 1, 2], kinds) == {}  # nothing moves: nothing to explain


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 6),
    data=st.data(),
)
def test_index_lists_follow_the_same_layers_as_value_lists(n, data):
    """Property: an index list rewritten equals the flags of a per-layer list rewritten."""
    source = data.draw(st.lists(st.integers(0, n - 1), min_size=1, max_size=8))
    listed = data.draw(st.lists(st.integers(0, n - 1), unique=True))
    flags = ["on" if j in listed else "off" for j in range(n)]
    cfg = rewrite({"mlp_only_layers": sorted(listed), "layer_types": flags}, source, [frozenset()] * n)
    assert cfg["mlp_only_layers"] == [i for i, f in enumerate(cfg["layer_types"]) if f == "on"]
