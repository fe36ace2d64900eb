"""Untrusted MoE inputs: prompts longer than the base model's context, remote code in the base."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
from moe_helpers import expert_config

from mergesmith.core.errors import MergeError
from mergesmith.moe import build_moe


def test_a_prompt_longer_than_the_context_is_refused_at_once(llama_models, tmp_path):
    cfg = expert_config(llama_models["base"], [llama_models["e0"], llama_models["e1"]], "hidden")
    cfg["experts"][1]["positive_prompts"].append("abc " * 200)  # 800 tokens; the context is 64
    start = time.perf_counter()
    with pytest.raises(MergeError, match="more than the base model's context of 64") as info:
        build_moe(cfg, tmp_path / "out", quiet=True)
    assert time.perf_counter() - start < 30
    assert "\n" not in str(info.value) and "shorten it" in str(info.value)
    assert not (tmp_path / "out").exists()


def test_base_auto_map_is_dropped_with_a_warning(llama_models, tmp_path, caplog):
    base = tmp_path / "base"
    shutil.copytree(llama_models["base"], base)
    cfg = json.loads((base / "config.json").read_text())
    cfg["auto_map"] = {"AutoModelForCausalLM": "modeling_x.X"}
    (base / "config.json").write_text(json.dumps(cfg))
    (base / "modeling_x.py").write_text(f"open({str(tmp_path / 'MARKER')!r}, 'w').write('ran')\n")
    with caplog.at_level("WARNING"):
        build_moe(
            expert_config(base, [llama_models["e0"], llama_models["e1"]], "hidden"),
            tmp_path / "out",
            quiet=True,
        )
    assert any("auto_map" in r.getMessage() for r in caplog.records)
    assert "auto_map" not in json.loads((tmp_path / "out" / "config.json").read_text())
    assert not (tmp_path / "MARKER").exists()


def test_a_prompt_past_the_context_is_one_line_from_the_shell(tmp_path):
    """transformers printed its own 'Token indices sequence length ...' line before mergesmith's error
    (the skill models' tokenizer knows the context; a subprocess sees what a user sees on stderr)."""
    import subprocess
    import sys

    import yaml

    models = Path(__file__).resolve().parents[2] / "examples" / "skills" / "models"
    cfg = {
        "base_model": str(models / "base"),
        "gate_mode": "calibrated",
        "experts": [
            {"source_model": str(models / "rev"), "positive_prompts": ["rev: " + "x" * 80 + "="]},
            {"source_model": str(models / "sort"), "positive_prompts": ["sort: abc="]},
        ],
    }
    (tmp_path / "moe.yml").write_text(yaml.safe_dump(cfg))
    run = subprocess.run(
        [sys.executable, "-m", "mergesmith.cli", "moe", str(tmp_path / "moe.yml"), str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 2 and run.stderr.count("\n") == 1, run.stderr
    assert "more than the base model's context of 64" in run.stderr and not (tmp_path / "out").exists()
