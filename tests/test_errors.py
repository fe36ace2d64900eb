"""Bad input: one line on stderr, exit code 2, nothing written."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from mergesmith.cli import main


def run_cli(args: list[str], capsys) -> tuple[int, str]:
    capsys.readouterr()  # drop what the fixtures printed
    code = main(args)
    err = capsys.readouterr().err
    return code, err


def edit_weights(folder: Path, fn) -> None:
    f = folder / "model.safetensors"
    tensors = load_file(f)
    fn(tensors)
    save_file(tensors, f, metadata={"format": "pt"})


@pytest.fixture
def pair(llama_trio, tmp_path):
    base, ft1, _ = llama_trio
    ft = tmp_path / "ft"
    shutil.copytree(ft1, ft)
    return base, ft


def ties_config(tmp_path: Path, base: Path, ft: Path, **extra) -> Path:
    cfg = {
        "merge_method": "ties",
        "base_model": str(base),
        "models": [{"model": str(ft), "parameters": {"weight": 1.0}}],
        **extra,
    }
    p = tmp_path / "cfg.yml"
    p.write_text(yaml.safe_dump(cfg))
    return p


def assert_fails(capsys, tmp_path, cfg: Path, pattern: str) -> None:
    out = tmp_path / "merged"
    code, err = run_cli(["merge", str(cfg), str(out), "--quiet"], capsys)
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mergesmith: error: "), err
    assert pattern in lines[0], lines[0]
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".merged")]


def test_missing_model_folder(capsys, tmp_path, llama_trio):
    cfg = ties_config(tmp_path, llama_trio[0], tmp_path / "nowhere")
    assert_fails(capsys, tmp_path, cfg, "folder not found")


def test_missing_weights(capsys, tmp_path, pair):
    base, ft = pair
    (ft / "model.safetensors").unlink()
    assert_fails(capsys, tmp_path, ties_config(tmp_path, base, ft), "no safetensors weights")


def test_missing_tensor(capsys, tmp_path, pair):
    base, ft = pair
    edit_weights(ft, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    assert_fails(
        capsys,
        tmp_path,
        ties_config(tmp_path, base, ft),
        "tensor 'model.layers.1.mlp.up_proj.weight' is in ",
    )


def test_shape_mismatch(capsys, tmp_path, pair):
    base, ft = pair
    edit_weights(ft, lambda t: t.__setitem__("model.layers.0.mlp.up_proj.weight", torch.zeros(64, 33)))
    assert_fails(capsys, tmp_path, ties_config(tmp_path, base, ft), "shapes differ")


def test_vocabulary_mismatch(capsys, tmp_path, llama_trio, model_factory):
    other = model_factory(tmp_path / "bigvocab", vocab=128)
    assert_fails(capsys, tmp_path, ties_config(tmp_path, llama_trio[0], other), "vocabulary sizes differ")


def test_layer_range_outside(capsys, tmp_path, llama_trio):
    cfg = tmp_path / "cfg.yml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "merge_method": "passthrough",
                "slices": [{"sources": [{"model": str(llama_trio[0]), "layer_range": [0, 9]}]}],
            }
        )
    )
    assert_fails(capsys, tmp_path, cfg, "outside its 3 layers")


def test_integer_tensor_in_one_model(capsys, tmp_path, pair):
    """An integer tensor where the other model has a float one cannot be merged (integer tensors that all
    models hold pass through: tests/test_layer_kinds.py)."""
    b2, ft = pair
    edit_weights(ft, lambda t: t.__setitem__("model.norm.weight", torch.ones(32, dtype=torch.int32)))
    assert_fails(capsys, tmp_path, ties_config(tmp_path, b2, ft), "needs floating-point tensors")


def test_truncated_safetensors(capsys, tmp_path, pair):
    base, ft = pair
    f = ft / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    assert_fails(capsys, tmp_path, ties_config(tmp_path, base, ft), "truncated")


def test_corrupt_header(capsys, tmp_path, pair):
    base, ft = pair
    (ft / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    assert_fails(capsys, tmp_path, ties_config(tmp_path, base, ft), "safetensors header")


def test_nan_result(capsys, tmp_path, pair):
    base, ft = pair
    edit_weights(ft, lambda t: t["model.layers.2.mlp.down_proj.weight"].__setitem__((0, 0), float("nan")))
    assert_fails(capsys, tmp_path, ties_config(tmp_path, base, ft), "NaN or Inf")


def test_method_needs_base(capsys, tmp_path, llama_trio):
    cfg = tmp_path / "cfg.yml"
    cfg.write_text(
        yaml.safe_dump(
            {"merge_method": "ties", "models": [{"model": str(llama_trio[1]), "parameters": {"weight": 1}}]}
        )
    )
    assert_fails(capsys, tmp_path, cfg, "needs a base_model")


def test_missing_required_parameter(capsys, tmp_path, llama_trio):
    cfg = tmp_path / "cfg.yml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "merge_method": "slerp",
                "base_model": str(llama_trio[0]),
                "models": [{"model": str(llama_trio[0])}, {"model": str(llama_trio[1])}],
            }
        )
    )
    assert_fails(capsys, tmp_path, cfg, "needs parameter 't'")


def test_unknown_parameter_and_method(capsys, tmp_path, pair):
    base, ft = pair
    assert_fails(
        capsys,
        tmp_path,
        ties_config(tmp_path, base, ft, parameters={"densty": 0.5}),
        "'densty' in top-level parameters is not a parameter",
    )
    assert_fails(
        capsys, tmp_path, ties_config(tmp_path, base, ft, merge_method="tiez"), "unknown merge_method 'tiez'"
    )


def test_unknown_key_and_bad_yaml(capsys, tmp_path, pair):
    base, ft = pair
    assert_fails(capsys, tmp_path, ties_config(tmp_path, base, ft, tokenizer_sorce="base"), "unknown key")
    cfg = tmp_path / "bad.yml"
    cfg.write_text("merge_method: [ties\n")
    assert_fails(capsys, tmp_path, cfg, "not valid YAML")


def test_missing_config_file_and_bad_sizes(capsys, tmp_path, pair):
    assert_fails(capsys, tmp_path, tmp_path / "none.yml", "config file not found")
    cfg = ties_config(tmp_path, *pair)
    code, err = run_cli(["merge", str(cfg), str(tmp_path / "merged"), "--out-shard-size", "lots"], capsys)
    assert code == 2 and "cannot read size 'lots'" in err
    for size in ("inf", "1e999", "infG"):  # past float's range: no OverflowError traceback
        code, err = run_cli(["merge", str(cfg), str(tmp_path / "merged"), "--out-shard-size", size], capsys)
        assert code == 2 and f"cannot read size '{size}'" in err and err.count("\n") == 1, err
    code, err = run_cli(["merge", str(cfg), str(tmp_path / "merged"), "--memory-limit", "10M"], capsys)
    assert code == 2 and "--memory-limit" in err


def test_memory_limit_too_small_for_a_tensor_is_said_up_front(capsys, tmp_path, pair, fixed_baseline):
    cfg = ties_config(tmp_path, *pair)
    code, err = run_cli(
        ["merge", str(cfg), str(tmp_path / "merged"), "--memory-limit", str(fixed_baseline + 100)], capsys
    )
    assert (
        code == 2 and "is too small for this merge" in err and "a limit that works is --memory-limit" in err
    )
    assert not (tmp_path / "merged").exists()
    smallest = err.split("--memory-limit ")[-1].split()[0]
    code, err = run_cli(
        ["merge", str(cfg), str(tmp_path / "merged"), "--memory-limit", smallest, "-q"], capsys
    )
    assert code == 0, err


def test_plan_prints_without_writing(capsys, tmp_path, pair):
    base, ft = pair
    cfg = ties_config(tmp_path, base, ft)
    assert main(["plan", str(cfg)]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[0].startswith("model.embed_tokens.weight [96x32 float32] ties weight=[1] density=[1]")
    assert "estimated peak memory" in out[-1]
    assert len(out) == 1 + len(load_file(base / "model.safetensors"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cfg.yml", "ft"]


def test_plan_json_schema(capsys):
    assert main(["plan", "--json-schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    assert "merge_method" in schema["properties"]


def test_cuda_without_gpu_is_a_clear_error(capsys, tmp_path, pair):
    import torch

    if torch.cuda.is_available():  # the GPU path is exercised by bench/gpu.sh
        return
    cfg = ties_config(tmp_path, *pair)
    code, err = run_cli(["merge", str(cfg), str(tmp_path / "merged"), "--quiet", "--device", "cuda"], capsys)
    assert code == 2 and "no CUDA GPU" in err
    assert not (tmp_path / "merged").exists()


def test_an_error_stays_one_line_whatever_a_key_holds(tmp_path, capsys):
    from mergesmith.cli import main

    cfg = tmp_path / "cfg.yml"
    cfg.write_text('merge_method: linear\nslices: {"\\r": 0, "\\u2028": 1}\n')
    assert main(["merge", str(cfg), str(tmp_path / "out"), "-q"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "'slices.\\r'" in err, err


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("num_hidden_layers", "three"),
        ("hidden_size", 128.5),
        ("vocab_size", "46"),
        ("tie_word_embeddings", "no"),
    ],
)
def test_a_config_json_transformers_cannot_build_is_refused_before_merging(
    capsys, tmp_path, pair, key, value
):
    """It was merged and its config.json copied into the output, which then failed to load."""
    base, ft = pair
    config = json.loads((ft / "config.json").read_text())
    config[key] = value
    (ft / "config.json").write_text(json.dumps(config))
    assert_fails(
        capsys, tmp_path, ties_config(tmp_path, base, ft), f"config.json's {key} is {json.dumps(value)}"
    )


def test_a_weight_that_overflows_is_one_line_without_numpy_warnings(capsys, tmp_path, pair):
    """numpy printed its overflow and invalid-value warnings (5 lines) before the finite check's error."""
    import warnings

    base, ft = pair
    models = [{"model": str(ft), "parameters": {"weight": 1e300}}]
    cfg = ties_config(tmp_path, base, ft, merge_method="task_arithmetic", models=models)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        assert_fails(capsys, tmp_path, cfg, "the merged values contain NaN or Inf")
    assert not [w for w in seen if issubclass(w.category, RuntimeWarning)], [str(w.message) for w in seen]


@pytest.mark.parametrize(
    ("config", "ok"),
    [
        ({"hidden_size": 64, "num_key_value_heads": None, "tie_word_embeddings": False}, True),
        ({"intermediate_size": [128, 256]}, True),  # one per layer (Gemma 3n)
        ({"text_config": {"hidden_size": 64}}, True),
        ({"hidden_size": True}, False),
        ({"intermediate_size": [128, 0]}, False),
        ({"intermediate_size": []}, False),
        ({"text_config": {"vocab_size": "46"}}, False),
        ({"tie_word_embeddings": 1}, False),
    ],
)
def test_config_values_that_describe_a_model(config, ok):
    from mergesmith.core.errors import MergeError
    from mergesmith.core.model import check_config_values

    if ok:
        check_config_values(config, "m")
    else:
        with pytest.raises(MergeError, match="config.json's "):
            check_config_values(config, "m")


def test_a_weights_file_that_is_a_folder_is_called_one(capsys, tmp_path, pair):
    """It was reported as a shard 'named in the index' that is missing, for a model without an index."""
    base, ft = pair
    (ft / "model.safetensors").unlink()
    (ft / "model.safetensors").mkdir()
    assert_fails(
        capsys, tmp_path, ties_config(tmp_path, base, ft), "weights file model.safetensors is a folder"
    )
