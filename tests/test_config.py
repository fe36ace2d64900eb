import pytest

from mergesmith.core.errors import ConfigError
from mergesmith.pipeline.config import load_config

GOOD = """
merge_method: ties
base_model: a
models:
  - model: b
    parameters: {weight: 0.5, density: [0.2, 0.8]}
parameters:
  t:
    - filter: self_attn
      value: [0, 1]
    - value: 0.5
dtype: bfloat16
"""


def test_good_config_parses():
    cfg = load_config(GOOD)
    assert cfg.merge_method == "ties" and cfg.models[0].parameters["density"] == [0.2, 0.8]


@pytest.mark.parametrize(
    "text, message",
    [
        (
            "merge_method: ties\nbase_model: a\nmodels: [{model: b}]\nparamters: {}\n",
            "paramters.*unknown key",
        ),
        ("merge_method: ties\nmodels: [{model: b, weight: 1}]\n", "models.0.weight.*unknown key"),
        ("models: [{model: b}]\n", "merge_method.*required"),
        ("merge_method: linear\n", "exactly one of 'models' or 'slices'"),
        ("merge_method: linear\nmodels: [{model: a}]\nslices: [{sources: [{model: a}]}]\n", "exactly one"),
        (
            "merge_method: passthrough\nslices: [{sources: [{model: a, layer_range: [4, 2]}]}]\n",
            "layer_range",
        ),
        ("merge_method: linear\nmodels: [{model: a}]\ndtype: [1]\n", "dtype"),
        ("- just\n- a list\n", "must be a YAML mapping"),
        ("merge_method: linear\nmodels: [{model: a\n", "not valid YAML.*line"),
        # PyYAML keeps the last of two equal keys: this merged with ties, silently
        (
            "merge_method: linear\nmerge_method: ties\nmodels: [{model: a}]\n",
            "line 2.*'merge_method' is given twice",
        ),
        ("merge_method: linear\nmodels: [{model: a, model: b}]\n", "'model' is given twice"),
        # an empty reference named the current folder: 'output folder ... is inside the input .'
        ("merge_method: linear\nmodels: [{model: ''}]\n", "'models.0.model'.*at least 1 character"),
    ],
)
def test_bad_configs_give_one_line_errors(text, message):
    with pytest.raises(ConfigError, match=message) as exc:
        load_config(text)
    assert "\n" not in str(exc.value)


def test_keys_brought_in_by_a_yaml_merge_may_be_overridden():
    cfg = load_config(
        "merge_method: ties\nbase_model: b\n"
        "models:\n  - model: a\n    parameters: &p {weight: 1.0, density: 0.5}\n"
        "  - model: c\n    parameters:\n      <<: *p\n      weight: 0.3\n"
    )
    assert cfg.models[1].parameters == {"weight": 0.3, "density": 0.5}


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(str(tmp_path / "nope.yml"))
