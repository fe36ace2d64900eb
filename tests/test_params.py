import pytest

from mergesmith.core.errors import ConfigError
from mergesmith.methods import REQUIRED, ParamSpec
from mergesmith.pipeline.config import FilterEntry
from mergesmith.pipeline.params import interpolate_gradient, layer_position, resolve

T = ParamSpec("t", per_model=False)
W = ParamSpec("weight", per_model=True, default=REQUIRED)


def test_gradient_interpolation_golden():
    g = [0.0, 0.5, 1.0]
    assert interpolate_gradient(g, 0.0) == 0.0
    assert interpolate_gradient(g, 0.25) == 0.25
    assert interpolate_gradient(g, 0.75) == 0.75
    assert interpolate_gradient(g, 1.0) == 1.0
    # layer 16 of 32 with five values: s = 16/31 * 4
    assert abs(interpolate_gradient([0.0, 0.3, 0.6, 0.8, 1.0], layer_position(16, 32)) - 0.6129032) < 1e-6
    assert interpolate_gradient([0.4], 0.7) == 0.4


def test_layer_position():
    assert layer_position(0, 5) == 0.0 and layer_position(4, 5) == 1.0 and layer_position(0, 1) == 1.0


def test_filters_first_match_wins_and_fall_through():
    top = {"t": [FilterEntry(filter="self_attn", value=0.1), FilterEntry(filter="attn", value=0.9)]}
    assert resolve(T, [None, top], "model.layers.0.self_attn.q_proj.weight", 0.0, "") == 0.1
    # no filter matches at this level: fall through to the default... t has none, so it is an error
    with pytest.raises(ConfigError, match="needs parameter 't'"):
        resolve(T, [top], "model.layers.0.mlp.up_proj.weight", 0.0, "")
    fallback = {"t": 0.5}
    assert resolve(T, [top, fallback], "model.layers.0.mlp.up_proj.weight", 0.0, "") == 0.5


def test_precedence_model_then_slice_then_top():
    levels = [{"weight": 1.0}, {"weight": 2.0}, {"weight": 3.0}]
    assert resolve(W, levels, "x", 0.0, "") == 1.0
    assert resolve(W, [None, {"weight": 2.0}, {"weight": 3.0}], "x", 0.0, "") == 2.0
    assert resolve(W, [None, None, {"weight": 3.0}], "x", 0.0, "") == 3.0


def test_filter_value_may_be_a_gradient():
    top = {"t": [FilterEntry(filter="mlp", value=[0.0, 1.0]), FilterEntry(value=0.5)]}
    assert resolve(T, [top], "layers.3.mlp.w", 0.25, "") == 0.25
    assert resolve(T, [top], "layers.3.attn.w", 0.25, "") == 0.5


def test_type_errors_name_the_parameter():
    with pytest.raises(ConfigError, match="'t'.*expected a number"):
        resolve(T, [{"t": "high"}], "x", 0.0, "")
    with pytest.raises(ConfigError, match="'normalize'.*true or false"):
        resolve(ParamSpec("normalize", False, True, bool), [{"normalize": 0.5}], "x", 0.0, "")
