"""Tokenizer, chat template and model references."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import mergesmith
from mergesmith.pipeline.chat_templates import BUILTIN


def linear_cfg(*models, **extra):
    return {
        "merge_method": "linear",
        "models": [{"model": str(m), "parameters": {"weight": 1.0}} for m in models],
        **extra,
    }


def test_tokenizer_source_model_copies_that_models_files(llama_trio, tmp_path):
    base, ft1, _ = llama_trio
    cfg = linear_cfg(base, ft1, tokenizer_source=str(ft1))
    out = mergesmith.merge(cfg, tmp_path / "a", quiet=True)
    assert json.loads((out / "tokenizer_config.json").read_text()) == json.loads(
        (ft1 / "tokenizer_config.json").read_text()
    )


def test_chat_template_auto_takes_the_inputs_template(llama_trio, tmp_path):
    import shutil

    base, ft1, _ = llama_trio
    m = tmp_path / "chat"
    shutil.copytree(ft1, m)
    (m / "chat_template.jinja").write_text(BUILTIN["chatml"])
    out = mergesmith.merge(linear_cfg(base, m, chat_template="auto"), tmp_path / "a", quiet=True)
    assert (out / "chat_template.jinja").read_text() == BUILTIN["chatml"]
    literal = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    out = mergesmith.merge(linear_cfg(base, m, chat_template=literal), tmp_path / "b", quiet=True)
    assert (out / "chat_template.jinja").read_text() == literal
    with pytest.raises(mergesmith.MergeError, match="neither a known name"):
        mergesmith.merge(linear_cfg(base, m, chat_template="nope"), tmp_path / "c", quiet=True)
    assert not (tmp_path / "c").exists()


def test_hub_reference_offline_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(
        mergesmith.MergeError, match="not a local folder, and fetching it from the Hugging Face Hub failed"
    ):
        mergesmith.merge(linear_cfg("some-org/some-model"), tmp_path / "out", quiet=True)


def test_console_script_help_and_progress(llama_trio, tmp_path):
    exe = [sys.executable, "-m", "mergesmith.cli"]
    assert subprocess.run([*exe, "--help"], capture_output=True).returncode == 0
    assert subprocess.run([*exe, "merge", "--help"], capture_output=True).returncode == 0
    bad = subprocess.run([*exe, "merge"], capture_output=True, text=True)
    assert bad.returncode == 2 and "required" in bad.stderr
    cfg = tmp_path / "c.yml"
    import yaml

    cfg.write_text(yaml.safe_dump(linear_cfg(*llama_trio[:2])))
    run = subprocess.run([*exe, "merge", str(cfg), str(tmp_path / "o")], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert "merging (linear)" in run.stderr and "tensors" in run.stderr and run.stdout == ""
    # the console script leaves through os._exit: what it printed must still arrive whole
    plan = subprocess.run(
        [sys.executable, "-m", "mergesmith", "plan", str(cfg)], capture_output=True, text=True
    )
    assert plan.returncode == 0, plan.stderr
    assert "model.embed_tokens.weight" in plan.stdout and plan.stdout.endswith("\n")
    assert (tmp_path / "o" / "config.json").is_file()
