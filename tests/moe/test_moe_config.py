"""The MoE config is mergekit-moe's format, strict: bad configs are one-line ConfigErrors that name the key."""

from __future__ import annotations

import pytest

from mergesmith.cli import main
from mergesmith.core.errors import ConfigError
from mergesmith.moe.config import load_moe_config


def cfg(**overrides) -> dict:
    base = {
        "base_model": "./base",
        "gate_mode": "hidden",
        "experts": [
            {"source_model": "./a", "positive_prompts": ["add: 1+2="]},
            {"source_model": "./b", "positive_prompts": ["rev: abc="], "negative_prompts": ["add: 3+4="]},
        ],
    }
    base.update(overrides)
    return base


def error_of(data: dict) -> str:
    with pytest.raises(ConfigError) as info:
        load_moe_config(data)
    msg = str(info.value)
    assert "\n" not in msg
    return msg


def test_defaults_match_mergekit_moe():
    c = load_moe_config(
        {
            "base_model": "b",
            "experts": [{"source_model": "x", "positive_prompts": ["p"]}] * 1,
            "experts_per_token": 1,
        }
    )
    assert c.gate_mode == "hidden" and c.mode == "hidden"
    assert load_moe_config(cfg()).experts_per_token == 2
    assert load_moe_config(cfg()).dtype is None and load_moe_config(cfg()).shared_experts is None


def test_yaml_text_with_every_mergekit_key():
    text = """
base_model: ./base
architecture: mixtral
gate_mode: hidden_last
dtype: bfloat16
experts_per_token: 1
experts:
  - source_model: ./a
    positive_prompts: ["x"]
    negative_prompts: ["y"]
    noise_scale: 0.01
    residual_scale: 0.5
  - source_model: ./b
    positive_prompts: ["y"]
shared_experts:
  - source_model: ./c
    residual_scale: 0.1
"""
    c = load_moe_config(text)
    assert c.mode == "hidden" and c.experts[0].noise_scale == 0.01 and c.shared_expert.residual_scale == 0.1


@pytest.mark.parametrize(
    ("data", "where"),
    [
        (cfg(gate_mod="hidden"), "'gate_mod': unknown key"),
        (
            cfg(experts=[{"source_model": "./a", "positive_prompt": ["x"]}]),
            "'experts.0.positive_prompt': unknown key",
        ),
        (cfg(calibration={"target": 0.8}, gate_mode="calibrated"), "'calibration.target': unknown key"),
    ],
)
def test_unknown_keys_are_named(data, where):
    msg = error_of(data)
    assert where in msg and "docs/moe.md" in msg


def test_unknown_gate_mode():
    assert "'gate_mode'" in error_of(cfg(gate_mode="orthogonal"))


def test_experts_per_token_above_expert_count():
    msg = error_of(cfg(experts_per_token=3))
    assert "experts_per_token is 3 but there are only 2 experts" in msg


def test_experts_per_token_below_one():
    assert "at least 1" in error_of(cfg(experts_per_token=0))


@pytest.mark.parametrize("mode", ["hidden", "hidden_avg", "cheap_embed", "calibrated"])
def test_prompt_modes_need_positive_prompts(mode):
    data = cfg(gate_mode=mode)
    data["experts"][1] = {"source_model": "./b"}
    msg = error_of(data)
    assert "expert 1 (./b) has no positive_prompts" in msg and f"gate_mode {mode}" in msg


@pytest.mark.parametrize("mode", ["random", "uniform_random"])
def test_random_modes_need_no_prompts(mode):
    c = load_moe_config(cfg(gate_mode=mode, experts=[{"source_model": "./a"}, {"source_model": "./b"}]))
    assert c.mode == mode


def test_identical_prompt_sets_are_rejected():
    data = cfg()
    data["experts"][1] = {"source_model": "./b", "positive_prompts": ["add: 1+2="]}
    msg = error_of(data)
    assert "experts 0 (./a) and 1 (./b) have identical prompt sets" in msg


def test_same_prompts_in_another_order_are_identical():
    data = cfg()
    data["experts"] = [
        {"source_model": "./a", "positive_prompts": ["x", "y"]},
        {"source_model": "./b", "positive_prompts": ["y", "x"]},
    ]
    assert "identical prompt sets" in error_of(data)


def test_different_negatives_make_prompt_sets_different():
    data = cfg()
    data["experts"][1] = {"source_model": "./b", "positive_prompts": ["add: 1+2="], "negative_prompts": ["z"]}
    assert load_moe_config(data).experts[1].negative_prompts == ["z"]


def test_calibration_only_with_calibrated_mode():
    assert "only used with gate_mode: calibrated" in error_of(cfg(calibration={"target_top1": 0.8}))
    c = load_moe_config(cfg(gate_mode="calibrated", calibration={"target_top1": 0.8, "tokens": "last"}))
    assert c.calibration.target_top1 == 0.8


def test_calibration_answers_and_shrinkage_keys():
    c = load_moe_config(cfg(gate_mode="calibrated", calibration={}))
    assert c.calibration.max_new_tokens == 32 and c.calibration.shrinkage is None  # cross-validated
    for value in ("ledoit_wolf", 0.0, 0.25, 1):
        c = load_moe_config(cfg(gate_mode="calibrated", calibration={"shrinkage": value}))
        assert c.calibration.shrinkage == value
    assert "calibration.shrinkage" in error_of(cfg(gate_mode="calibrated", calibration={"shrinkage": 1.5}))
    assert "calibration.shrinkage" in error_of(cfg(gate_mode="calibrated", calibration={"shrinkage": "lw"}))
    assert "not true/false" in error_of(cfg(gate_mode="calibrated", calibration={"max_new_tokens": True}))
    assert "calibration.max_new_tokens" in error_of(
        cfg(gate_mode="calibrated", calibration={"max_new_tokens": -1})
    )
    assert (
        load_moe_config(
            cfg(gate_mode="calibrated", calibration={"max_new_tokens": 0})
        ).calibration.max_new_tokens
        == 0
    )


def test_at_most_one_shared_expert():
    shared = [{"source_model": "./c"}, {"source_model": "./d"}]
    assert "at most one" in error_of(cfg(shared_experts=shared))


def test_negative_noise_scale():
    data = cfg()
    data["experts"][0]["noise_scale"] = -1
    assert "'experts.0.noise_scale'" in error_of(data)


@pytest.mark.parametrize("key", ["noise_scale", "residual_scale"])
@pytest.mark.parametrize("value", [float("inf"), float("nan")])
def test_scales_must_be_finite(key, value):
    data = cfg()
    data["experts"][0][key] = value
    assert f"'experts.0.{key}'" in error_of(data) and "finite" in error_of(data)


def test_cli_prints_one_line_and_exits_2(tmp_path, capsys):
    path = tmp_path / "moe.yml"
    path.write_text("base_model: ./base\nexperts:\n  - source_model: ./a\n    positive_prompts: [x]\n")
    assert main(["moe", str(path), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mergesmith: error:") and "experts_per_token is 2" in err[0]
    assert not (tmp_path / "out").exists()


def test_command_module_imports_without_torch():
    """`mergesmith --help` builds every parser: registering `moe` must not pull in torch."""
    import subprocess
    import sys

    code = (
        "import sys; from mergesmith import cli; cli.COMMAND_MODULES = ['mergesmith.moe.command']; "
        "cli.build_parser().format_help(); "
        "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize(
    ("value", "message"),
    [(float("nan"), "Input should be a finite number"), (2.0, "Input should be less than or equal to 1")],
)
def test_shrinkage_errors_name_the_key_not_pydantics_union_member(value, message):
    """The location read 'calibration.shrinkage.constrained-float'."""
    data = cfg(gate_mode="calibrated", calibration={"shrinkage": value})
    assert f"at 'calibration.shrinkage': {message}" in error_of(data)
