"""What a merge means: architectures, tensors only some models have, parameters written where the method
does not read them, parameter domains, and the messages that explain each."""

from __future__ import annotations

import logging
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import transformers
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import load_file

import mergesmith
from mergesmith.cli import main
from mergesmith.core.errors import ConfigError, MergeError
from mergesmith.methods import merge_tensors
from mergesmith.pipeline.api import make_plan
from mergesmith.pipeline.config import parse_config


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def write(tmp_path: Path, cfg: dict, name: str = "cfg.yml") -> Path:
    p = tmp_path / name
    p.write_text(yaml.safe_dump(cfg))
    return p


def linear(*models: Path) -> dict:
    return {
        "merge_method": "linear",
        "models": [{"model": str(m), "parameters": {"weight": 0.5}} for m in models],
    }


def ties(base: Path, *models: Path, per_model: dict | None = None, **top) -> dict:
    params = {"weight": 0.5, **(per_model or {})}
    cfg = {"merge_method": "ties", "base_model": str(base), "models": [{"model": str(m)} for m in models]}
    for m in cfg["models"]:
        m["parameters"] = dict(params)
    if top:
        cfg["parameters"] = top
    return cfg


@pytest.fixture(scope="module")
def llama_qwen(tmp_path_factory, model_factory) -> tuple[Path, Path]:
    """A Llama and a Qwen2 of the same sizes: every shared tensor lines up; Qwen2 has q/k/v biases."""
    root = tmp_path_factory.mktemp("crimes")
    return model_factory(root / "llama", "llama"), model_factory(root / "qwen", "qwen2", seed=1)


def tensor_names(folder: Path) -> set[str]:
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        return set(f.keys())


# --- architectures and tensors only some models have ---------------------------------------------------


@pytest.mark.parametrize("order", [0, 1])
def test_different_architectures_are_an_error_naming_both(llama_qwen, tmp_path, capsys, order):
    models = llama_qwen if order == 0 else llama_qwen[::-1]
    code, _, err = run_cli(["merge", str(write(tmp_path, linear(*models))), str(tmp_path / "out")], capsys)
    assert code == 2 and err.count("\n") == 1, err
    assert "LlamaForCausalLM (model_type llama)" in err and "Qwen2ForCausalLM (model_type qwen2)" in err
    assert "--allow-crimes" in err and not (tmp_path / "out").exists()
    code, _, err = run_cli(["plan", str(write(tmp_path, linear(*models)))], capsys)
    assert code == 2 and "different architectures" in err


@pytest.mark.parametrize("order", [0, 1])
def test_allow_crimes_carries_the_biases_only_one_model_has(llama_qwen, tmp_path, caplog, order):
    llama, qwen = llama_qwen
    models = (llama, qwen) if order == 0 else (qwen, llama)
    with caplog.at_level(logging.WARNING, logger="mergesmith"):
        out = mergesmith.merge(linear(*models), tmp_path / "out", quiet=True, allow_crimes=True)
    biases = {n for n in tensor_names(qwen) if n.endswith("_proj.bias")}
    assert len(biases) == 9  # q, k, v of 3 layers
    assert biases <= tensor_names(out)  # never dropped
    merged, original = load_file(out / "model.safetensors"), load_file(qwen / "model.safetensors")
    for name in biases:  # copied unmerged from the one model that has them
        assert merged[name].equal(original[name])
    shared = "model.layers.0.mlp.up_proj.weight"
    expected = 0.5 * load_file(llama / "model.safetensors")[shared] + 0.5 * original[shared]
    assert (merged[shared] - expected).abs().max() < 1e-6  # the rest is merged as usual
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "9 tensor(s) are in" in warnings[0] and "copied unmerged" in warnings[0]


def test_allow_crimes_with_strict_is_an_error_for_a_carried_tensor(llama_qwen, tmp_path):
    with pytest.raises(ConfigError, match=r"9 tensor\(s\) are in .* \(an error under --strict\)"):
        make_plan(linear(*llama_qwen), allow_crimes=True, strict=True)


def test_a_tensor_missing_from_one_model_of_one_architecture(llama_trio, tmp_path):
    base, ft1, _ = llama_trio
    ft = tmp_path / "ft"
    shutil.copytree(ft1, ft)
    tensors = load_file(ft / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    from safetensors.torch import save_file

    save_file(tensors, ft / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(
        MergeError, match=r"tensor 'model.layers.1.mlp.up_proj.weight' is in '.*base' but not in"
    ):
        make_plan(ties(base, ft))
    plan = make_plan(ties(base, ft), allow_crimes=True)
    try:
        carried = next(t for t in plan.tensors if t.name == "model.layers.1.mlp.up_proj.weight")
        assert carried.inputs[0].model == str(base) and carried.method == "passthrough"  # the base's copy
        assert len(plan.warnings) == 1
    finally:
        plan.close()


def test_multi_stage_files_take_allow_crimes(llama_qwen, tmp_path, capsys):
    llama, qwen = llama_qwen
    docs = [
        {**linear(llama, qwen), "name": "soup"},
        {"merge_method": "passthrough", "models": [{"model": "soup"}]},
    ]
    cfg = tmp_path / "stages.yml"
    cfg.write_text(yaml.safe_dump_all(docs))
    code, _, err = run_cli(["plan", str(cfg), "--summary"], capsys)
    assert code == 2 and "--allow-crimes" in err
    code, out, err = run_cli(["plan", str(cfg), "--summary", "--allow-crimes"], capsys)
    assert code == 0, err
    assert "warning: 9 tensor(s)" in out


# --- parameters written where the method does not read them ---------------------------------------------


def cli(*args: str) -> subprocess.CompletedProcess:
    """The real command line in a subprocess: its logging goes to stderr as a user sees it."""
    return subprocess.run(
        [sys.executable, "-m", "mergesmith", *args], capture_output=True, text=True, timeout=300
    )


def test_lambda_under_a_model_warns_and_is_ignored_as_mergekit_does(llama_trio, tmp_path):
    base, ft1, ft2 = llama_trio
    plain = mergesmith.merge(ties(base, ft1, ft2), tmp_path / "plain", quiet=True)
    misplaced = ties(base, ft1, ft2)
    misplaced["models"][0]["parameters"]["lambda"] = 3.0
    done = cli("merge", str(write(tmp_path, misplaced)), str(tmp_path / "out"), "-q")
    assert done.returncode == 0, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mergesmith: warning: "), done.stderr
    assert f"parameter 'lambda' of model '{ft1}' is ignored" in lines[0]
    assert "once per tensor" in lines[0] and "top-level `parameters`" in lines[0]
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == (plain / "model.safetensors").read_bytes()
    done = cli("merge", str(write(tmp_path, misplaced)), str(tmp_path / "strict"), "-q", "--strict")
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "--strict" in done.stderr
    assert not (tmp_path / "strict").exists()


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        # a parameter the chosen method does not take at all (another method does)
        (
            lambda c: c.update(merge_method="sce", parameters={"normalize": True}),
            "parameter 'normalize' in top-level parameters is ignored: merge_method 'sce' does not take it",
        ),
        # a per-model parameter of the base model of a task-vector method
        (
            lambda c: c["models"].append({"model": c["base_model"], "parameters": {"weight": 1.0}}),
            "of base model '{base}' is ignored: ties takes per-model parameters from the models merged into",
        ),
        # a per-tensor parameter in a slice source
        (
            lambda c: c.update(
                models=None,
                slices=[
                    {
                        "sources": [
                            {"model": c["base_model"]},
                            {"model": c["models"][0]["model"], "parameters": {"weight": 1, "lambda": 2}},
                        ]
                    }
                ],
            ),
            "parameter 'lambda' of model '{ft1}' in slice 0 is ignored",
        ),
    ],
)
def test_misplaced_parameters_warn_in_plan_and_fail_under_strict(llama_trio, tmp_path, capsys, edit, message):
    base, ft1, _ = llama_trio
    cfg = ties(base, ft1)
    edit(cfg)
    cfg = {k: v for k, v in cfg.items() if v is not None}
    message = message.format(base=base, ft1=ft1)
    path = write(tmp_path, cfg)
    code, out, err = run_cli(["plan", str(path), "--summary"], capsys)
    assert code == 0, err
    assert [line for line in out.splitlines() if line.startswith("warning:")] == [
        line for line in out.splitlines() if message in line
    ]
    assert message in out
    code, _, err = run_cli(["plan", str(path), "--strict"], capsys)
    assert code == 2 and message in err and err.count("\n") == 1


def test_per_model_parameters_at_the_top_level_apply_to_every_model(llama_trio):
    base, ft1, ft2 = llama_trio
    cfg = {
        "merge_method": "ties",
        "base_model": str(base),
        "models": [{"model": str(ft1)}, {"model": str(ft2)}],
    }
    cfg["parameters"] = {"weight": 0.7, "density": 0.4}
    plan = make_plan(cfg, strict=True)
    try:
        t = plan.tensors[1]
        assert dict(t.params)["weight"] == (0.7, 0.7) and dict(t.params)["density"] == (0.4, 0.4)
        assert plan.warnings == []
    finally:
        plan.close()


def test_a_parameter_of_no_method_is_an_error_with_did_you_mean(llama_trio):
    base, ft1, _ = llama_trio
    cfg = ties(base, ft1, per_model={"densty": 0.5})
    with pytest.raises(
        ConfigError,
        match=r"'densty' of model .* is not a parameter of any merge method; did you mean 'density'\?",
    ):
        make_plan(cfg)


# --- did you mean ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("doc", "where", "suggestion"),
    [
        ({"merge_methd": "ties", "models": [{"model": "a"}]}, "merge_methd", "merge_method"),
        (
            {
                "merge_method": "slerp",
                "models": [{"model": "a"}],
                "parameters": {"t": [{"filtr": "mlp", "value": 1}]},
            },
            "parameters.t.0.filtr",
            "filter",
        ),
        ({"merge_method": "linear", "models": [{"modle": "a"}]}, "models.0.modle", "model"),
        (
            {"merge_method": "passthrough", "slices": [{"sources": [{"model": "a", "layer_rang": [0, 1]}]}]},
            "slices.0.sources.0.layer_rang",
            "layer_range",
        ),
        (
            {"merge_method": "passthrough", "slices": [{"source": [{"model": "a"}]}]},
            "slices.0.source",
            "sources",
        ),
        (
            {"merge_method": "linear", "models": [{"model": "a"}], "tokenizer": {"sorce": "base"}},
            "tokenizer.sorce",
            "source",
        ),
        (
            {"merge_method": "linear", "models": [{"model": "a"}], "base_modle": "a"},
            "base_modle",
            "base_model",
        ),
    ],
)
def test_unknown_keys_suggest_the_nearest_known_key(doc, where, suggestion):
    with pytest.raises(ConfigError) as info:
        parse_config(doc)
    assert (
        str(info.value) == f"config: invalid config at '{where}': unknown key; did you mean {suggestion!r}?"
    )


@settings(max_examples=60, deadline=None)
@given(key=st.text(alphabet="abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=12))
def test_any_unknown_top_level_key_is_one_line_naming_it(key):
    from mergesmith.methods import all_parameter_names
    from mergesmith.pipeline.config import UNSUPPORTED_KEYS, MergeConfig

    # a merge parameter at the top level is ignored with a warning, as mergekit ignores it
    # (tests/test_mergekit_compat.py); every other key is unknown
    known = {*MergeConfig.model_fields, *UNSUPPORTED_KEYS, "modules", *all_parameter_names()}
    if key in known:
        return
    with pytest.raises(ConfigError) as info:
        parse_config({"merge_method": "linear", "models": [{"model": "a"}], key: 1})
    assert f"'{key}': unknown key" in str(info.value) and "\n" not in str(info.value)


# --- messages ----------------------------------------------------------------------------------------------


def test_a_hidden_size_mismatch_says_what_differs(llama_trio, tmp_path):
    cfg = transformers.LlamaConfig(
        hidden_size=48,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=96,
        max_position_embeddings=64,
    )
    wide = tmp_path / "wide"
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(wide)
    with pytest.raises(MergeError) as info:
        make_plan(ties(llama_trio[0], wide))
    msg = str(info.value)
    assert "vocabular" not in msg and "tokenizer" not in msg
    assert "[96, 48]" in msg and "[96, 32]" in msg and "hidden_size 48 vs 32" in msg


def test_t_under_a_model_says_where_it_belongs(llama_trio):
    base, ft1, _ = llama_trio
    cfg = {
        "merge_method": "slerp",
        "base_model": str(base),
        "models": [{"model": str(base)}, {"model": str(ft1), "parameters": {"t": 0.5}}],
    }
    with pytest.raises(ConfigError) as info:
        make_plan(cfg)
    msg = str(info.value)
    assert msg.count("model.embed_tokens.weight") == 1, msg
    assert f"'t' is set under model '{ft1}'" in msg and "top-level `parameters`" in msg


# --- parameter domains -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "key", "value", "allowed"),
    [
        ("ties", "density", 1.7, "(0, 1]"),
        ("ties", "density", 0.0, "(0, 1]"),
        ("dare_ties", "density", -0.2, "(0, 1]"),
        ("della", "epsilon", -0.1, ">= 0"),
        ("breadcrumbs", "gamma", 1.0, "[0, 1)"),
    ],
)
def test_per_model_values_outside_their_domain(llama_trio, tmp_path, capsys, method, key, value, allowed):
    base, ft1, _ = llama_trio
    cfg = ties(base, ft1, per_model={key: value})
    cfg["merge_method"] = method
    code, _, err = run_cli(["merge", str(write(tmp_path, cfg)), str(tmp_path / "out")], capsys)
    assert code == 2 and err.count("\n") == 1 and not (tmp_path / "out").exists()
    assert f"parameter '{key}' of model '{ft1}' for tensor model.embed_tokens.weight is {value:g}" in err
    assert f"must be {'in ' if allowed[0] in '([' else ''}{allowed}" in err


@pytest.mark.parametrize(
    ("method", "params", "message"),
    [
        (
            "ram",
            {"epsilon": -1e-3},
            "parameter 'epsilon' for tensor model.embed_tokens.weight is -0.001; it must be >= 0",
        ),
        ("sce", {"select_topk": 1.5}, "parameter 'select_topk' for tensor model.embed_tokens.weight is 1.5"),
        (
            "nearswap",
            {"t": -0.5},
            "parameter 't' for tensor model.embed_tokens.weight is -0.5; it must be >= 0",
        ),
    ],
)
def test_per_tensor_values_outside_their_domain(llama_trio, method, params, message):
    base, ft1, _ = llama_trio
    cfg = {
        "merge_method": method,
        "base_model": str(base),
        "models": [{"model": str(ft1)}],
        "parameters": params,
    }
    with pytest.raises(ConfigError, match="^" + message.replace("(", r"\(").replace(")", r"\)")):
        make_plan(cfg)


def test_a_gradient_is_checked_where_it_leaves_the_domain(llama_trio):
    base, ft1, _ = llama_trio
    cfg = ties(base, ft1, per_model={"density": [0.5, 1.5]})  # layers at positions 0, 0.5, 1: 0.5, 1.0, 1.5
    with pytest.raises(ConfigError, match=r"for tensor model.layers.2.\S+ is 1.5; it must be in \(0, 1\]"):
        make_plan(cfg)


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_non_finite_weights_and_lambda(llama_trio, value):
    base, ft1, _ = llama_trio
    with pytest.raises(ConfigError, match="expected a finite number"):
        make_plan(ties(base, ft1, per_model={"weight": value}))
    with pytest.raises(ConfigError, match="expected a finite number"):
        make_plan(ties(base, ft1, **{"lambda": value}))


def test_unusual_values_mergekit_accepts_are_accepted(llama_trio):
    """Negative weights (task negation), negative lambda, and t outside [0, 1] in slerp (extrapolation
    along the arc) are legal in mergekit and here."""
    base, ft1, _ = llama_trio
    for cfg in (
        ties(base, ft1, per_model={"weight": -0.5}, **{"lambda": -1.0}),
        {
            "merge_method": "slerp",
            "base_model": str(base),
            "models": [{"model": str(base)}, {"model": str(ft1)}],
            "parameters": {"t": 1.5},
        },
        linear(base, ft1)
        | {
            "models": [
                {"model": str(base), "parameters": {"weight": 2.0}},
                {"model": str(ft1), "parameters": {"weight": -1.0}},
            ]
        },
    ):
        make_plan(cfg, strict=True).close()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(density=st.floats(min_value=-2.0, max_value=3.0, allow_nan=False))
def test_density_is_accepted_exactly_in_its_domain(llama_trio, density):
    base, ft1, _ = llama_trio
    cfg = ties(base, ft1, per_model={"density": density})
    if 0.0 < density <= 1.0:
        make_plan(cfg).close()
    else:
        with pytest.raises(ConfigError, match=r"'density' .* must be in \(0, 1\]"):
            make_plan(cfg)


def test_merge_tensors_checks_domains_too():
    import torch

    base, model = torch.zeros(4, 4), torch.ones(4, 4)
    with pytest.raises(MergeError, match=r"'density' of model 0 is 1.7; it must be in \(0, 1\]"):
        merge_tensors("ties", [model], base=base, weight=[1.0], density=[1.7])


# --- -v ----------------------------------------------------------------------------------------------------


def test_verbose_says_backend_budget_and_timings(llama_trio, tmp_path):
    base, ft1, ft2 = llama_trio
    cfg = write(tmp_path, ties(base, ft1, ft2))
    cmd = [sys.executable, "-m", "mergesmith", "merge", str(cfg), str(tmp_path / "out"), "-q", "-v"]
    done = subprocess.run([*cmd, "--memory-limit", "2G"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    info = [line for line in done.stderr.splitlines() if line.startswith("mergesmith: info: ")]
    for start in ("plan: ", "backend: native (", "memory: ", "memory limit ", "merge: ", "finish: "):
        assert any(line.startswith("mergesmith: info: " + start) for line in info), (start, done.stderr)
    quiet = subprocess.run(cmd[:-1] + ["--overwrite"], capture_output=True, text=True, timeout=300)
    assert quiet.returncode == 0 and "INFO" not in quiet.stderr
    plan = cli("plan", str(cfg), "--summary", "-v")
    assert plan.returncode == 0 and "mergesmith: info: backend: native" in plan.stderr, plan.stderr
    helptext = cli("merge", "-h").stdout
    assert "more detail: -v info (backend, budget, per-stage timing)" in " ".join(helptext.split())
