"""mergekit configs from the wild: the ``modules:`` syntax, ``random_seed`` written as a parameter, and
mergesmith's extensions of mergekit's methods, which never change a mergekit config's result silently."""

from __future__ import annotations

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

import mergesmith
from mergesmith.cli import main
from mergesmith.core.errors import ConfigError
from mergesmith.methods import get_method, methods
from mergesmith.pipeline.api import make_plan
from mergesmith.pipeline.config import parse_config
from mergesmith.pipeline.params import _MISSING, lookup


def plan_lines(cfg: dict, **options) -> tuple[list[str], list[str]]:
    plan = make_plan(cfg, **options)
    try:
        return [t.describe() for t in plan.tensors], list(plan.warnings)
    finally:
        plan.close()


def weights_of(cfg: dict, **options) -> dict[str, tuple]:
    plan = make_plan(cfg, **options)
    try:
        return {t.name: dict(t.params)["weight"] for t in plan.tensors}
    finally:
        plan.close()


# --- modules: ------------------------------------------------------------------------------------------


def test_modules_default_models_is_the_models_config(llama_trio):
    base, ft1, ft2 = llama_trio
    models = [{"model": str(ft1), "parameters": {"weight": 0.3}}, {"model": str(ft2)}]
    plain = {
        "merge_method": "ties",
        "base_model": str(base),
        "models": models,
        "parameters": {"weight": 0.6, "density": 0.5},
    }
    modular = {
        "merge_method": "ties",
        "base_model": str(base),
        "modules": {"default": {"models": models, "parameters": {"weight": 0.6}}},
        "parameters": {"density": 0.5},
    }
    assert plan_lines(modular, strict=True) == plan_lines(plain, strict=True)
    w = weights_of(modular)
    assert set(w.values()) == {(0.3, 0.6)}  # the model's own weight wins over the module's


def test_modules_default_slices_is_the_slices_config(llama_trio):
    base, ft1, _ = llama_trio
    slices = [
        {"sources": [{"model": str(base), "layer_range": [0, 2]}]},
        {"sources": [{"model": str(ft1), "layer_range": [1, 3]}]},
    ]
    plain = {"merge_method": "passthrough", "slices": slices}
    modular = {"merge_method": "passthrough", "modules": {"default": {"slices": slices}}}
    lines, warnings = plan_lines(modular, strict=True)
    assert lines == plan_lines(plain)[0] and warnings == []
    assert sum(".layers.3." in line for line in lines) > 0 and not any(".layers.4." in x for x in lines)


def test_a_module_filter_that_matches_nothing_falls_through_to_the_top_level(llama_trio):
    _, ft1, ft2 = llama_trio
    cfg = {
        "merge_method": "linear",
        "modules": {
            "default": {
                "models": [{"model": str(ft1)}, {"model": str(ft2), "parameters": {"weight": 5.0}}],
                "parameters": {"weight": [{"filter": "mlp", "value": 2.0}]},
            }
        },
        "parameters": {"weight": 1.0},
    }
    w = weights_of(cfg)
    mlp = [v for name, v in w.items() if ".mlp." in name]
    other = [v for name, v in w.items() if ".mlp." not in name]
    assert mlp and set(mlp) == {(2.0, 5.0)}
    assert other and set(other) == {(1.0, 5.0)}


_setting = st.one_of(
    st.floats(-2, 2, allow_nan=False),
    st.lists(st.floats(0, 1), min_size=1, max_size=3),
    st.lists(
        st.fixed_dictionaries(
            {"filter": st.sampled_from(["mlp", "self_attn", "norm", "*"]), "value": st.floats(0, 1)}
        ),
        min_size=1,
        max_size=3,
    ),
)


@settings(max_examples=80, deadline=None)
@given(
    high=st.dictionaries(st.sampled_from(["weight", "t"]), _setting, max_size=2),
    low=st.dictionaries(st.sampled_from(["weight", "t"]), _setting, max_size=2),
    tensor=st.sampled_from(["model.layers.0.mlp.up_proj.weight", "model.layers.1.self_attn.q_proj.weight"]),
    position=st.floats(0, 1),
)
def test_module_parameters_rank_between_slices_and_the_top_level(high, low, tensor, position):
    """Folding the module's parameters into the top-level ones answers every lookup as asking the module's
    first and then the top-level ones does."""
    doc = {"merge_method": "linear", "models": [{"model": "a"}]}
    folded = parse_config(
        {
            "merge_method": "linear",
            "modules": {"default": {"models": [{"model": "a"}], "parameters": high or None}},
            "parameters": low or None,
        }
    )
    high_cfg = parse_config({**doc, "parameters": high or None})
    low_cfg = parse_config({**doc, "parameters": low or None})
    for name in ("weight", "t"):
        want = lookup(name, [high_cfg.parameters, low_cfg.parameters], tensor, position)
        got = lookup(name, [folded.parameters], tensor, position)
        assert (got is _MISSING and want is _MISSING) or got == want


@pytest.mark.parametrize(
    ("modules", "message"),
    [
        (
            {"text_decoder": {"models": [{"model": "a"}]}, "vision_tower": {"models": [{"model": "a"}]}},
            "module(s) 'text_decoder', 'vision_tower' select parts of a multimodal or encoder-decoder model",
        ),
        ({"default": {"models": [{"model": "a"}], "slices": []}}, "give exactly one of 'models' or 'slices'"),
        ({"default": {"models": [{"modle": "a"}]}}, "'modules.default.models.0.modle': unknown key"),
        ([{"models": []}], "must map module names"),
    ],
)
def test_modules_that_cannot_be_slices_are_one_line_errors(modules, message):
    with pytest.raises(ConfigError) as info:
        parse_config({"merge_method": "linear", "modules": modules})
    assert message in str(info.value) and "\n" not in str(info.value)
    if "text_decoder" in str(modules):
        assert "write 'models:' or 'slices:'" in str(info.value)


def test_modules_with_models_is_an_error():
    with pytest.raises(ConfigError, match="exactly one of 'models', 'slices' or 'modules'"):
        parse_config(
            {
                "merge_method": "linear",
                "models": [{"model": "a"}],
                "modules": {"default": {"models": [{"model": "a"}]}},
            }
        )


# --- random_seed ---------------------------------------------------------------------------------------


def test_random_seed_as_a_parameter_is_ignored_with_a_warning_saying_where_it_belongs(llama_trio, capsys):
    base, ft1, ft2 = llama_trio
    cfg = {
        "merge_method": "dare_ties",
        "base_model": str(base),
        "models": [{"model": str(m), "parameters": {"weight": 0.5, "density": 0.5}} for m in (ft1, ft2)],
    }
    lines, warnings = plan_lines(cfg)
    seeded = {**cfg, "parameters": {"random_seed": 42}}
    seeded_lines, seeded_warnings = plan_lines(seeded)
    assert seeded_lines == lines and warnings == []
    assert seeded_warnings == [
        "parameter 'random_seed' in top-level parameters is ignored, as mergekit ignores it: the seed is not "
        "a merge parameter; pass --random-seed N (random_seed=N in mergesmith.merge)"
    ]
    with pytest.raises(ConfigError, match=r"random_seed.*--random-seed N.*\(an error under --strict\)"):
        make_plan(seeded, strict=True)
    cfg["models"][0]["parameters"]["random_seed"] = 1
    assert f"parameter 'random_seed' of model '{ft1}' is ignored" in plan_lines(cfg)[1][0]


def test_random_seed_as_a_top_level_key_says_where_it_belongs():
    with pytest.raises(ConfigError) as info:
        parse_config({"merge_method": "linear", "models": [{"model": "a"}], "random_seed": 7})
    assert "'random_seed'" in str(info.value) and "--random-seed N" in str(info.value)


# --- extensions ----------------------------------------------------------------------------------------

# The parameters of mergekit 0.1.5's methods (read from each method's spec in its wheel), for the methods
# both tools have.
MERGEKIT_PARAMETERS = {
    "arcee_fusion": set(),
    "breadcrumbs": {"int8_mask", "normalize", "rescale", "lambda", "weight", "density", "gamma"},
    "breadcrumbs_ties": {"int8_mask", "normalize", "rescale", "lambda", "weight", "density", "gamma"},
    "dare_linear": {"int8_mask", "normalize", "rescale", "lambda", "weight", "density"},
    "dare_ties": {"int8_mask", "normalize", "rescale", "lambda", "weight", "density"},
    "della": {"int8_mask", "normalize", "rescale", "lambda", "weight", "density", "epsilon"},
    "della_linear": {"int8_mask", "normalize", "rescale", "lambda", "weight", "density", "epsilon"},
    "karcher": {"max_iter", "tol"},
    "linear": {"weight", "normalize"},
    "model_stock": {"filter_wise"},
    "multislerp": {"weight", "normalize_weights", "eps"},
    "nearswap": {"t"},
    "nuslerp": {"weight", "nuslerp_row_wise", "nuslerp_flatten"},
    "passthrough": {"scale"},
    "ram": {"epsilon"},
    "sce": {"int8_mask", "select_topk"},
    "slerp": {"t"},
    "task_arithmetic": {"int8_mask", "normalize", "rescale", "lambda", "weight", "density"},
    "ties": {"int8_mask", "normalize", "rescale", "lambda", "weight", "density"},
}


def test_every_parameter_mergekit_lacks_is_marked_as_an_extension():
    for name in methods():
        if name not in MERGEKIT_PARAMETERS:
            continue  # not a mergekit method (tsv, iso_*): a mergekit config cannot name it
        ours = {p.name for p in get_method(name).params}
        extensions = {p.name for p in get_method(name).params if p.extension}
        assert ours - MERGEKIT_PARAMETERS[name] == extensions, name
        assert MERGEKIT_PARAMETERS[name] <= ours, name


def stock(base, ft1, ft2, method="model_stock", weights=(0.7, 0.3)) -> dict:
    return {
        "merge_method": method,
        "base_model": str(base),
        "models": [{"model": str(m), "parameters": {"weight": w}} for m, w in zip((ft1, ft2), weights)],
    }


@pytest.mark.parametrize("method", ["model_stock", "karcher", "sce"])
def test_weights_mergekit_ignores_warn_once_and_compat_ignores_them(llama_trio, method):
    base, ft1, ft2 = llama_trio
    cfg = stock(base, ft1, ft2, method)
    lines, warnings = plan_lines(cfg)
    assert len(warnings) == 1, warnings
    assert warnings[0].startswith("parameter 'weight' changes this merge's result from mergekit's (0.7, 0.3")
    assert f"mergekit's {method} takes no weights" in warnings[0] and "--mergekit-compat" in warnings[0]
    with pytest.raises(ConfigError, match="an error under --strict"):
        make_plan(cfg, strict=True)
    unweighted = {**cfg, "models": [{"model": str(ft1)}, {"model": str(ft2)}]}
    compat_lines, compat_warnings = plan_lines(cfg, mergekit_compat=True, strict=True)
    assert compat_warnings == [] and compat_lines == plan_lines(unweighted)[0] != lines


@pytest.mark.parametrize("weights", [(2.0, 2.0), (1.0, 1.0)])
def test_equal_weights_give_mergekits_result_and_no_warning(llama_trio, weights):
    cfg = stock(*llama_trio, weights=weights)
    lines, warnings = plan_lines(cfg, strict=True)
    assert warnings == []
    unweighted = {**cfg, "models": [{"model": m["model"]} for m in cfg["models"]]}
    assert plan_lines(cfg, mergekit_compat=True)[0] == plan_lines(unweighted)[0]


def test_model_stock_compat_writes_the_unweighted_merge(llama_trio, tmp_path, capsys):
    base, ft1, ft2 = llama_trio
    cfg = stock(base, ft1, ft2)
    plain = mergesmith.merge(
        {**cfg, "models": [{"model": str(ft1)}, {"model": str(ft2)}]}, tmp_path / "plain", quiet=True
    )
    weighted = mergesmith.merge(cfg, tmp_path / "weighted", quiet=True)
    compat = mergesmith.merge(cfg, tmp_path / "compat", quiet=True, mergekit_compat=True)
    data = {p.name: (p / "model.safetensors").read_bytes() for p in (plain, weighted, compat)}
    assert data["compat"] == data["plain"] != data["weighted"]
    path = tmp_path / "cfg.yml"
    path.write_text(yaml.safe_dump(cfg))
    capsys.readouterr()
    assert main(["plan", str(path), "--summary", "--mergekit-compat", "--strict"]) == 0
    assert "warning:" not in capsys.readouterr().out
    assert main(["plan", str(path), "--summary"]) == 0
    assert "warning: parameter 'weight' changes this merge's result" in capsys.readouterr().out


# --- gradients -----------------------------------------------------------------------------------------


def test_a_one_layer_slice_takes_a_gradients_last_value_as_mergekit_does(llama_trio):
    """mergekit places the one layer of a one-layer slice at t = 1; embeddings and the final norm sit at 0."""
    base, ft1, _ = llama_trio
    cfg = {
        "merge_method": "passthrough",
        "slices": [
            {"sources": [{"model": str(base), "layer_range": [0, 2], "parameters": {"scale": [0.5, 2.0]}}]},
            {"sources": [{"model": str(ft1), "layer_range": [2, 3], "parameters": {"scale": [0.5, 2.0]}}]},
        ],
    }
    plan = make_plan(cfg)
    try:
        scale = {t.name: dict(t.params)["scale"][0] for t in plan.tensors}
    finally:
        plan.close()
    layer = {name.split(".layers.")[1].split(".")[0] for name in scale if ".layers." in name}
    assert layer == {"0", "1", "2"}
    for name, value in scale.items():
        if ".layers.2." in name or ".layers.1." in name:
            assert value == 2.0, name
        elif ".layers.0." in name or "embed_tokens" in name:
            assert value == 0.5, name


# --- values and keys as configs in the wild write them ---------------------------------------------------


def _ties(base, ft1, ft2, weight, density, lam) -> dict:
    return {
        "merge_method": "ties",
        "base_model": str(base),
        "models": [
            {"model": str(ft1), "parameters": {"weight": weight, "density": density}},
            {"model": str(ft2), "parameters": {"weight": 0.5, "density": 0.5}},
        ],
        "parameters": {"lambda": lam},
    }


def test_numbers_written_as_strings_read_as_numbers(llama_trio):
    """YAML 1.1 reads `1e-5` (no dot) as a string, and quoted numbers are strings: mergekit reads both as
    numbers, and so do we; the plan is the one the numbers give."""
    base, ft1, ft2 = llama_trio
    text = yaml.safe_dump(_ties(base, ft1, ft2, "0.5", "5e-1", "1"))
    loaded = yaml.safe_load(text.replace("'5e-1'", "5e-1"))  # unquoted, as a user writes it
    assert loaded["models"][0]["parameters"]["density"] == "5e-1"  # still a string after YAML
    assert plan_lines(loaded, strict=True) == plan_lines(_ties(base, ft1, ft2, 0.5, 0.5, 1.0), strict=True)


@pytest.mark.parametrize(
    ("weight", "density", "lam"),
    [
        (1, 1, 2),  # ints where floats are meant
        ([1], [1.0], [2]),  # one-element lists: a gradient of one value is that value everywhere
        ([1.0], 1, "2"),
        (1, [{"filter": "mlp", "value": [1]}, {"value": 1}], 2),  # inside a filter too
    ],
)
def test_ints_and_one_element_lists_read_as_the_number(llama_trio, weight, density, lam):
    """mergekit reads `weight: 1` as 1.0 and `weight: [1]` as a gradient of one value; so do we: the plan
    is the one of the plain floats (a different number would show in every line)."""
    base, ft1, ft2 = llama_trio
    expected = plan_lines(_ties(base, ft1, ft2, 1.0, 1.0, 2.0), strict=True)
    assert plan_lines(_ties(base, ft1, ft2, weight, density, lam), strict=True) == expected
    assert plan_lines(_ties(base, ft1, ft2, 1.0, 1.0, 3.0), strict=True) != expected


def test_slerp_t_as_an_int_or_a_one_element_list(llama_trio):
    base, ft1, _ = llama_trio
    cfg = {
        "merge_method": "slerp",
        "base_model": str(base),
        "models": [{"model": str(base)}, {"model": str(ft1)}],
    }
    expected = plan_lines({**cfg, "parameters": {"t": 0.0}}, strict=True)
    for t in (0, [0], [0.0], "0"):
        assert plan_lines({**cfg, "parameters": {"t": t}}, strict=True) == expected, t


def test_text_that_is_no_number_stays_an_error(llama_trio):
    base, ft1, ft2 = llama_trio
    with pytest.raises(ConfigError, match="parameter 'density' .*expected a number, got 'half'"):
        make_plan(_ties(base, ft1, ft2, 0.5, "half", 1.0))


def test_parameters_written_at_the_top_level_are_ignored_with_a_warning(llama_trio):
    """An unindented `int8_mask: true` or `normalize: true`: mergekit ignores it; we merge the same and
    say so, once per key; --strict refuses it; a key that is no parameter stays an error."""
    base, ft1, ft2 = llama_trio
    plain = _ties(base, ft1, ft2, 0.5, 0.5, 1.0)
    stray = {**plain, "int8_mask": True, "normalize": False}
    lines, warnings = plan_lines(stray)
    assert lines == plan_lines(plain)[0]
    assert len(warnings) == 2
    assert (
        "top-level key 'int8_mask' is ignored" in warnings[0]
        and "`parameters: {int8_mask: true}`" in warnings[0]
    )
    assert "'normalize'" in warnings[1]
    with pytest.raises(ConfigError, match="top-level key 'int8_mask' is ignored.*--strict"):
        make_plan(stray, strict=True)
    with pytest.raises(ConfigError, match="unknown key; did you mean 'base_model'"):
        make_plan({**plain, "base_modle": str(base)})
