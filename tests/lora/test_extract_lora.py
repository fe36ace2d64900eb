"""``mergesmith extract-lora``: SVD factors that PEFT loads, with honest reconstruction errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from _lora_helpers import make_adapter, peft_merged
from safetensors.torch import load_file, save_file

import mergesmith
from mergesmith.cli import main
from mergesmith.lora.extract import extract_lora


def weights(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def cli(args: list[str], capsys) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def full_rank(llama_trio, tmp_path_factory) -> Path:
    base, ft1, _ = llama_trio
    out = tmp_path_factory.mktemp("extract") / "full"
    extract_lora(str(base), str(ft1), out, rank=64, include_embeddings=True, quiet=True)
    return out


def test_full_rank_reconstructs_and_peft_loads_it(llama_trio, full_rank):
    base, ft1, _ = llama_trio
    report = json.loads((full_rank / "lora_report.json").read_text())
    assert report["summary"]["max_relative_error"] < 1e-5
    assert {m["module"] for m in report["modules"]} >= {"model.embed_tokens", "lm_head"}
    merged, ft, untouched = peft_merged(base, full_rank), weights(ft1), weights(base)
    for name, w in ft.items():
        if w.dim() == 2:  # every matrix is in the adapter: base + B A = the fine-tune
            torch.testing.assert_close(merged[name], w, rtol=0, atol=1e-5)
        else:  # norms are not (they are identical in this fine-tune)
            assert torch.equal(merged[name], untouched[name])
    config = json.loads((full_rank / "adapter_config.json").read_text())
    assert config["r"] == 32 and config["lora_alpha"] == 32  # the largest real rank, not the requested 64
    assert config["rank_pattern"]["model.layers.0.self_attn.k_proj"] == 16  # k_proj is 16 x 32
    assert config["base_model_name_or_path"] == str(base)


def test_peft_merge_equals_base_plus_extracted_delta(llama_trio, tmp_path):
    """At a low rank, PEFT's merge is exactly base + B @ A of the saved factors, module by module."""
    base, ft1, _ = llama_trio
    out = tmp_path / "r3"
    reports = extract_lora(str(base), str(ft1), out, rank=3, quiet=True)
    factors, b, merged = weights(out), weights(base), peft_merged(base, out)
    for r in reports:
        prefix = "base_model.model." + r.module
        delta = factors[prefix + ".lora_B.weight"] @ factors[prefix + ".lora_A.weight"]
        torch.testing.assert_close(merged[r.tensor], b[r.tensor] + delta, rtol=0, atol=1e-6)
        # the error is the Eckart-Young tail of the singular values
        s = torch.linalg.svdvals(weights(ft1)[r.tensor].double() - b[r.tensor].double())
        expected = float(s[r.rank :].norm() / s.norm())
        assert r.relative_error == pytest.approx(expected, rel=1e-4)
    # and mergesmith applies its own adapter as PEFT does
    applied = mergesmith.merge(
        {"merge_method": "passthrough", "models": [{"model": f"{base}+{out}"}]}, tmp_path / "m", quiet=True
    )
    for name, w in weights(applied).items():
        assert torch.equal(w, merged[name]), name


def test_extracting_a_lora_gives_it_back(llama_trio, tmp_path):
    base = llama_trio[0]
    adapter = make_adapter(
        base, tmp_path / "lora", seed=7, r=4, lora_alpha=8, target_modules=["q_proj", "up_proj"]
    )
    out = tmp_path / "out"
    reports = extract_lora(str(base), f"{base}+{adapter}", out, rank=4, quiet=True)
    by_module = {r.module: r for r in reports}
    assert by_module["model.layers.1.mlp.up_proj"].relative_error < 1e-5
    assert by_module["model.layers.1.self_attn.q_proj"].relative_error < 1e-5
    # the modules the adapter did not touch are identical: not saved, not averaged in
    assert set(by_module) == {
        f"model.layers.{i}.{m}" for i in range(3) for m in ("mlp.up_proj", "self_attn.q_proj")
    }
    report = json.loads((out / "lora_report.json").read_text())
    assert "model.layers.1.self_attn.k_proj" in report["unchanged"]
    assert report["summary"]["unchanged_modules"] == len(report["unchanged"]) == 3 * 7 - 6
    saved = weights(out)
    assert not any("k_proj" in k for k in saved) and len(saved) == 2 * len(reports)
    assert json.loads((out / "adapter_config.json").read_text())["target_modules"] == ["q_proj", "up_proj"]


def test_unchanged_modules_leave_the_mean(llama_trio, tmp_path, capsys):
    """Half the layers identical to the base: the mean error is the mean over the changed ones only, and
    stderr says how many were left out."""
    base, ft1, _ = llama_trio
    ft = tmp_path / "ft"
    shutil.copytree(ft1, ft)
    tensors, original = load_file(ft / "model.safetensors"), load_file(base / "model.safetensors")
    for name in tensors:
        if name.startswith("model.layers.0."):
            tensors[name] = original[name].clone()
    save_file(tensors, ft / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "out"
    code, stdout, stderr = cli(
        ["extract-lora", "--base", str(base), "--model", str(ft), "--rank", "2", str(out)], capsys
    )
    assert code == 0
    assert "7 selected module(s) are identical in both models" in stderr
    report = json.loads((out / "lora_report.json").read_text())
    errors = [m["relative_error"] for m in report["modules"]]
    assert len(errors) == 14 and all(e > 0 for e in errors)
    assert report["summary"]["mean_relative_error"] == pytest.approx(sum(errors) / 14)
    assert not any(m["module"].startswith("model.layers.0.") for m in report["modules"])
    assert "# 14 modules: mean relative error" in stdout and "model.layers.0." not in stdout


def test_model_equal_to_base_is_one_line(llama_trio, tmp_path, capsys):
    base, _, _ = llama_trio
    copy = tmp_path / "copy"
    shutil.copytree(base, copy)
    norm_only = tmp_path / "norm_only"
    shutil.copytree(base, norm_only)
    tensors = load_file(norm_only / "model.safetensors")
    tensors["model.norm.weight"] = tensors["model.norm.weight"] * 2
    save_file(tensors, norm_only / "model.safetensors", metadata={"format": "pt"})
    cases = {
        str(base): "is --base",  # the same folder: refused before reading anything
        f"{base}/.": "is --base",
        str(copy): "is identical to base",  # another folder with the same weights
        str(norm_only): "no selected weight of model",  # only a norm differs: the adapter would be empty
    }
    for model, message in cases.items():
        out = tmp_path / "out"
        args = ["extract-lora", "--base", str(base), "--model", model, "--rank", "2", str(out)]
        code, _, err = cli(args, capsys)
        assert code == 2 and message in err and err.count("\n") == 1, err
        assert not out.exists() and not list(tmp_path.glob(".out.*"))
    assert "1 not a matrix (norm or bias; see --save-norms) (e.g. model.norm.weight)" in err


def test_gpt2_conv1d_orientation(model_factory, tmp_path):
    base = model_factory(tmp_path / "base", "gpt2")
    adapter = make_adapter(
        base, tmp_path / "lora", r=4, lora_alpha=4, fan_in_fan_out=True, target_modules=["c_attn", "c_proj"]
    )
    out = tmp_path / "out"
    reports = extract_lora(
        str(base), f"{base}+{adapter}", out, rank=4, include=[r"attn\.c_(attn|proj)"], quiet=True
    )
    assert {r.kind for r in reports} == {"conv1d"} and max(r.relative_error for r in reports) < 1e-5
    assert json.loads((out / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    want = peft_merged(base, adapter)
    got = peft_merged(base, out)
    for r in reports:
        torch.testing.assert_close(got[r.tensor], want[r.tensor], rtol=0, atol=1e-5)


def test_cli_table_report_and_uncaptured_norms(llama_trio, tmp_path, capsys):
    base, ft1, _ = llama_trio
    ft = tmp_path / "ft"
    shutil.copytree(ft1, ft)
    tensors = load_file(ft / "model.safetensors")
    tensors["model.norm.weight"] = tensors["model.norm.weight"] * 1.5
    save_file(tensors, ft / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "out"
    code, stdout, stderr = cli(
        [
            "extract-lora",
            "--base",
            str(base),
            "--model",
            str(ft),
            "--rank",
            "2",
            "--exclude",
            "mlp",
            str(out),
        ],
        capsys,
    )
    assert code == 0
    assert "rel. error" in stdout and "model.layers.2.self_attn.v_proj" in stdout and "mlp" not in stdout
    assert "1 not a matrix (norm or bias; see --save-norms) (e.g. model.norm.weight)" in stderr
    report = json.loads((out / "lora_report.json").read_text())
    skipped = {s["tensor"]: s for s in report["not_captured"]}
    assert skipped["model.norm.weight"]["relative_change"] == pytest.approx(0.5)
    assert skipped["model.layers.0.mlp.up_proj.weight"]["why"] == "left out by --include/--exclude"
    assert skipped["model.embed_tokens.weight"]["why"].startswith("outside the decoder layers")
    assert json.loads((out / "adapter_config.json").read_text())["target_modules"] == [
        "k_proj",
        "o_proj",
        "q_proj",
        "v_proj",
    ]


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("rank0", "--rank must be at least 1"),
        ("missing", "folder not found"),
        ("shapes", "shapes differ"),
        ("exists", "already exists"),
        ("nothing", "no weights to extract"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(llama_trio, model_factory, tmp_path, capsys, case, message):
    base, ft1, _ = llama_trio
    out = tmp_path / "out"
    args = ["extract-lora", "--base", str(base), "--model", str(ft1), "--rank", "4", str(out)]
    if case == "rank0":
        args[args.index("--rank") + 1] = "0"
    elif case == "missing":
        args[args.index("--model") + 1] = str(tmp_path / "nope")
    elif case == "shapes":
        args[args.index("--model") + 1] = str(model_factory(tmp_path / "wide", "llama", layers=3, vocab=128))
        args.append("--include-embeddings")
    elif case == "exists":
        out.mkdir()
    elif case == "nothing":
        args += ["--include", "no_such_module"]
    code, _, err = cli(args, capsys)
    assert code == 2
    assert message in err and err.count("\n") == 1
    assert out.exists() == (case == "exists")
    assert not list(tmp_path.glob(".out.*"))


def test_save_norms_as_modules_to_save(family_models, tmp_path):
    """GPT-2's LayerNorms (weight and bias) travel whole; PEFT and mergesmith both restore them."""
    base, ft = family_models["gpt2"]
    changed = tmp_path / "ft"
    shutil.copytree(ft, changed)
    tensors = load_file(changed / "model.safetensors")
    tensors["transformer.h.1.ln_2.bias"] = tensors["transformer.h.1.ln_2.bias"] + 0.25
    tensors["transformer.ln_f.weight"] = tensors["transformer.ln_f.weight"] * 0.5
    save_file(tensors, changed / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "out"
    extract_lora(str(base), str(changed), out, rank=64, save_norms=True, quiet=True)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["modules_to_save"] == ["transformer.h.1.ln_2", "transformer.ln_f"]
    report = json.loads((out / "lora_report.json").read_text())
    assert report["saved_whole"] == config["modules_to_save"]
    assert not any("ln_" in s["tensor"] for s in report["not_captured"])
    want = weights(changed)
    for got in (
        peft_merged(base, out),
        weights(
            mergesmith.merge(
                {"merge_method": "passthrough", "models": [{"model": f"{base}+{out}"}]},
                tmp_path / "m",
                quiet=True,
            )
        ),
    ):
        for name in (
            "transformer.h.1.ln_2.bias",
            "transformer.ln_f.weight",
            "transformer.h.0.attn.c_attn.weight",
        ):
            torch.testing.assert_close(got[name], want[name], rtol=0, atol=1e-5)


def test_biases_of_factored_modules_are_reported(family_models, tmp_path):
    base, ft = family_models["qwen2"]  # q/k/v projections have biases
    changed = tmp_path / "ft"
    shutil.copytree(ft, changed)
    tensors = load_file(changed / "model.safetensors")
    tensors["model.layers.0.self_attn.q_proj.bias"] = tensors["model.layers.0.self_attn.q_proj.bias"] + 0.1
    save_file(tensors, changed / "model.safetensors", metadata={"format": "pt"})
    extract_lora(str(base), str(changed), tmp_path / "out", rank=2, save_norms=True, quiet=True)
    report = json.loads((tmp_path / "out" / "lora_report.json").read_text())
    skipped = {s["tensor"]: s["why"] for s in report["not_captured"]}
    assert (
        skipped["model.layers.0.self_attn.q_proj.bias"] == "bias of a factored module (a LoRA cannot hold it)"
    )
    assert report["saved_whole"] == []  # a bias is not a norm module: --save-norms leaves it
