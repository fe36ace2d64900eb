"""eval reads everything mergesmith writes (BitNet outputs in fp16/bf16, MODEL+ADAPTER references) and
turns every malformed input into one line."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import torch._dynamo
import yaml
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

from mergesmith import cli


@pytest.fixture
def eager():
    """transformers compiles its BitNet kernels with torch.compile; the same code runs eagerly here."""
    with torch._dynamo.config.patch(disable=True):
        yield


def ppl(run_cli, model: str, text: Path) -> float:
    code, out, err = run_cli("eval", model, "--ppl", str(text), "--json", "--quiet")
    assert code == 0, err
    return json.loads(out)["models"][0]["ppl"][text.stem]


@pytest.fixture
def text(tmp_path) -> Path:
    path = tmp_path / "lines.txt"
    path.write_text("12 + 30 = 42\nabc def\n")
    return path


def in_dtype(src: Path, dest: Path, dtype: torch.dtype) -> Path:
    AutoModelForCausalLM.from_pretrained(src, dtype=dtype).save_pretrained(dest)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(src / name, dest / name)
    return dest


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_eval_reads_bitnet_outputs(dtype, tiny_llama, tmp_path, text, run_cli, monkeypatch, eager):
    monkeypatch.setattr(cli, "COMMAND_MODULES", ["mergesmith.eval.command", "mergesmith.bitnet.command"])
    model = in_dtype(tiny_llama, tmp_path / "half", dtype)
    code, _, err = run_cli("bitnet", str(model), str(tmp_path / "b158"))
    assert code == 0, err
    value = ppl(run_cli, str(tmp_path / "b158"), text)
    assert math.isfinite(value) and value > 1


def test_eval_reads_merge_bitnet_outputs(tiny_llama_factory, tmp_path, text, run_cli, monkeypatch, eager):
    monkeypatch.setattr(cli, "COMMAND_MODULES", ["mergesmith.eval.command", "mergesmith.pipeline.command"])
    a = in_dtype(tiny_llama_factory(tmp_path / "a", seed=1), tmp_path / "a16", torch.bfloat16)
    b = in_dtype(tiny_llama_factory(tmp_path / "b", seed=2), tmp_path / "b16", torch.bfloat16)
    cfg = tmp_path / "cfg.yml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "merge_method": "linear",
                "models": [{"model": str(m), "parameters": {"weight": 0.5}} for m in (a, b)],
            }
        )
    )
    code, _, err = run_cli("merge", str(cfg), str(tmp_path / "out"), "--out-format", "bitnet", "--quiet")
    assert code == 0, err
    assert math.isfinite(ppl(run_cli, str(tmp_path / "out"), text))


def test_eval_of_model_plus_adapter_equals_eval_of_the_merged_folder(
    tiny_llama, tmp_path, text, run_cli, monkeypatch
):
    monkeypatch.setattr(cli, "COMMAND_MODULES", ["mergesmith.eval.command", "mergesmith.pipeline.command"])
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    module = "base_model.model.model.layers.0.mlp.down_proj"
    g = torch.Generator().manual_seed(0)
    save_file(
        {
            f"{module}.lora_A.weight": torch.randn(2, 64, generator=g),
            f"{module}.lora_B.weight": torch.randn(32, 2, generator=g) * 0.5,
        },
        adapter / "adapter_model.safetensors",
    )
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4}))
    ref = f"{tiny_llama}+{adapter}"
    cfg = tmp_path / "cfg.yml"
    cfg.write_text(yaml.safe_dump({"merge_method": "passthrough", "models": [{"model": ref}]}))
    code, _, err = run_cli("merge", str(cfg), str(tmp_path / "merged"), "--quiet")
    assert code == 0, err
    with_adapter = ppl(run_cli, ref, text)
    assert with_adapter == ppl(run_cli, str(tmp_path / "merged"), text)
    assert with_adapter != ppl(run_cli, str(tiny_llama), text)  # the adapter was applied


def one_line_failure(run_cli, *argv: str) -> str:
    code, out, err = run_cli(*argv)
    assert code == 2, err
    assert out == "" and err.count("\n") == 1 and err.startswith("mergesmith: error: "), err
    return err


def test_truncated_weights(tiny_llama, text, run_cli):
    path = tiny_llama / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-50])
    assert "truncated" in one_line_failure(run_cli, "eval", str(tiny_llama), "--ppl", str(text))


@pytest.mark.parametrize(
    "content",
    [b"{not json", b'{"model": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", b"\xff\xfe\x00garbage", b"[]"],
)
def test_malformed_tokenizer_json(content, tiny_llama, text, run_cli):
    (tiny_llama / "tokenizer.json").write_bytes(content)
    assert "tokenizer" in one_line_failure(run_cli, "eval", str(tiny_llama), "--ppl", str(text))


def test_pickle_only_folder(tiny_llama, text, run_cli):
    (tiny_llama / "model.safetensors").unlink()
    (tiny_llama / "pytorch_model.bin").write_bytes(b"never unpickled")
    err = one_line_failure(run_cli, "eval", str(tiny_llama), "--ppl", str(text))
    assert "pytorch_model.bin" in err and "convert them to safetensors" in err


def test_tokenizer_symlinked_out_of_the_model(tiny_llama, tmp_path, text, run_cli):
    outside = tmp_path / "outside.json"
    shutil.move(tiny_llama / "tokenizer.json", outside)
    (tiny_llama / "tokenizer.json").symlink_to(outside)
    assert "outside the model" in one_line_failure(run_cli, "eval", str(tiny_llama), "--ppl", str(text))


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        (
            "num_hidden_layers",
            -3,
            "num_hidden_layers is -3, not a whole number",
        ),  # was a ValueError traceback
        ("num_hidden_layers", "two", 'num_hidden_layers is "two", not a whole number'),
        ("hidden_size", 64.5, "hidden_size is 64.5"),
        ("tie_word_embeddings", "no", 'tie_word_embeddings is "no", not true or false'),
        # the tiny Llama has 2 layers: transformers dropped the second, or built 3 more at random, and
        # the model was scored silently
        ("num_hidden_layers", 1, "config.json says num_hidden_layers=1 but no layer stack"),
        ("num_hidden_layers", 5, "config.json says num_hidden_layers=5 but no layer stack"),
        ("num_hidden_layers", 10**30, "no layer stack"),  # was a hang
    ],
)
def test_config_json_that_does_not_describe_the_checkpoint(key, value, message, tiny_llama, text, run_cli):
    config = json.loads((tiny_llama / "config.json").read_text())
    config[key] = value
    (tiny_llama / "config.json").write_text(json.dumps(config))
    assert message in one_line_failure(run_cli, "eval", str(tiny_llama), "--ppl", str(text))
