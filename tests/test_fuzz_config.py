"""Fuzzing merge configs through the command line, in-process, on the tiny models.

Random mappings mix valid keys and values with junk (unknown keys, wrong types, NaN, out-of-range
numbers, missing or repeated models, bad paths, nesting). Every run either exits 0 with an output that
loads, or exits 2 with exactly one line on stderr and nothing written (no output, no hidden leftovers).
Never a traceback, never a hang.
"""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

from mergesmith.cli import main

METHODS = ["linear", "slerp", "ties", "dare_ties", "task_arithmetic", "passthrough", "model_stock", "della"]
PARAM_KEYS = ["weight", "density", "t", "epsilon", "lambda", "normalize", "rescale", "int8_mask", "k", "junk"]

junk = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-5, max_value=5),
    st.floats(allow_nan=True, allow_infinity=True, width=32),
    st.text(max_size=8),
    st.lists(st.integers(min_value=0, max_value=3), max_size=3),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)
number = st.one_of(st.sampled_from([0.1, 0.5, 1.0]), st.floats(min_value=-0.5, max_value=1.5))
param_value = st.one_of(
    number,
    st.lists(number, min_size=1, max_size=4),  # a gradient
    st.lists(
        st.fixed_dictionaries({"filter": st.sampled_from(["mlp", "self_attn", "x"]), "value": number}),
        max_size=2,
    ),
    junk,
)
# mostly values a method accepts, sometimes junk: the merge itself must be reached often
usual = st.fixed_dictionaries({"weight": number}, optional={"density": number, "t": number})
parameters = st.one_of(
    usual, usual, usual, st.dictionaries(st.sampled_from(PARAM_KEYS), param_value, max_size=4)
)


def mostly(valid, rare=junk):
    """``valid`` nine times in ten, ``rare`` otherwise."""
    return st.integers(0, 9).flatmap(lambda i: rare if i == 4 else valid)  # not 0: hypothesis favours it


@st.composite
def configs(draw, refs: list[str]) -> dict:
    model_ref = mostly(st.sampled_from(refs), st.sampled_from(["/nonexistent/model", "./nope", ""]))
    cfg: dict = {}
    if draw(st.integers(0, 19)) != 7:
        cfg["merge_method"] = draw(mostly(st.sampled_from(METHODS)))
    if draw(st.integers(0, 3)) != 2:
        entries = st.fixed_dictionaries({"model": model_ref}, optional={"parameters": parameters})
        cfg["models"] = draw(
            mostly(st.lists(entries, min_size=1, max_size=3, unique_by=lambda e: e["model"]))
        )
    else:
        source = st.fixed_dictionaries(
            {"model": model_ref},
            optional={
                "layer_range": st.one_of(st.tuples(st.integers(-1, 4), st.integers(-1, 4)).map(list), junk),
                "parameters": parameters,
            },
        )
        cfg["slices"] = draw(
            st.one_of(
                st.lists(st.fixed_dictionaries({"sources": st.lists(source, max_size=3)}), max_size=2), junk
            )
        )
    if draw(st.booleans()):
        cfg["base_model"] = draw(st.one_of(model_ref, junk))
    if draw(st.booleans()):
        cfg["parameters"] = draw(st.one_of(parameters, junk))
    for key, values in {
        "dtype": ["float16", "bfloat16", "float32", "int8", "fp64"],
        "out_dtype": ["float16", "float32", "half"],
        "tokenizer_source": ["base", "union", refs[1]],
        "chat_template": ["auto", "chatml", "nonsense"],
        "merge_methd": ["linear"],
        "name": ["x"],
    }.items():
        if draw(st.integers(0, 9)) == 4:
            cfg[key] = draw(mostly(st.sampled_from(values)))
    return cfg


@st.composite
def near_valid(draw, refs: list[str]) -> dict:
    """A config of the usual shape (method, base, two models, their parameters), then a few of its
    values replaced by junk: most of these reach the merge itself."""
    method = draw(st.sampled_from(METHODS))
    takes = {"ties": ["density"], "dare_ties": ["density"], "della": ["density", "epsilon"]}.get(method, [])
    per_model = st.fixed_dictionaries(
        {} if method in ("slerp", "model_stock") else {"weight": number}, optional={k: number for k in takes}
    )
    models = [{"model": r, "parameters": draw(per_model)} for r in draw(st.permutations(refs[1:]))]
    cfg: dict = {"merge_method": method, "base_model": refs[0], "models": models}
    if method == "passthrough":
        cfg = {"merge_method": method, "models": [{"model": refs[1]}]}
    if method == "slerp":
        cfg["models"] = [{"model": refs[1]}]
        cfg["parameters"] = {"t": draw(number)}
    for _ in range(draw(st.integers(0, 2))):
        where = draw(st.sampled_from(["top", "model", "param", "method"]))
        if where == "top":
            cfg[draw(st.sampled_from(["dtype", "out_dtype", "base_model", "junk", "tokenizer_source"]))] = (
                draw(junk)
            )
        elif where == "model":
            cfg["models"][0][draw(st.sampled_from(["model", "parameters", "x"]))] = draw(junk)
        elif where == "param" and isinstance(cfg["models"][0].get("parameters"), dict):
            cfg["models"][0]["parameters"][draw(st.sampled_from(PARAM_KEYS))] = draw(param_value)
        else:
            cfg["merge_method"] = draw(st.sampled_from(METHODS))
    return cfg


@pytest.fixture(scope="module")
def refs(llama_trio) -> list[str]:
    return [str(p) for p in llama_trio]


def check_run(cfg: dict, capsys) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        path = root / "cfg.yml"
        path.write_text(yaml.safe_dump(cfg, allow_unicode=True))
        out = root / "out"
        capsys.readouterr()
        code = main(["merge", str(path), str(out), "--quiet"])
        err = capsys.readouterr().err
        leftovers = sorted(p.name for p in root.iterdir() if p.name not in ("cfg.yml", "out"))
        assert not leftovers, leftovers
        if code == 0:
            config = json.loads((out / "config.json").read_text())
            assert isinstance(config, dict)
            for shard in out.glob("*.safetensors"):
                for name, tensor in load_file(shard).items():
                    assert tensor.is_floating_point() is False or math.isfinite(
                        float(tensor.float().sum())
                    ), name
            return
        assert code == 2, err
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("mergesmith: error: "), err
        assert not out.exists()


@settings(
    max_examples=300,
    deadline=10_000,
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
    ],
)
@given(data=st.data())
def test_any_config_merges_or_fails_in_one_line(data, refs, capsys) -> None:
    check_run(data.draw(st.one_of(near_valid(refs), configs(refs))), capsys)


def test_a_valid_config_from_the_generator_merges(refs, capsys) -> None:
    """The fuzzer's valid corner is reachable: the same shape of config merges."""
    cfg = {"merge_method": "ties", "base_model": refs[0], "models": [{"model": refs[1]}, {"model": refs[2]}]}
    cfg["parameters"] = {"weight": 0.5, "density": 0.5}
    check_run(cfg, capsys)
