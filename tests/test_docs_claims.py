"""What the docs say about the config and the shipped models is what the code does."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

from safetensors import safe_open

import mergesmith
from mergesmith.cli import main
from mergesmith.methods import methods
from mergesmith.pipeline.config import config_json_schema

ROOT = Path(__file__).resolve().parents[1]


def test_json_schema_lists_the_methods(capsys):
    assert config_json_schema()["properties"]["merge_method"]["enum"] == sorted(methods())
    assert main(["plan", "--json-schema"]) == 0
    enum = json.loads(capsys.readouterr().out)["properties"]["merge_method"]["enum"]
    assert len(enum) == 22 and {"ties", "slerp", "task_arithmetic", "passthrough"} <= set(enum)
    assert "`enum` of `merge_method`" in (ROOT / "docs" / "config.md").read_text()


def test_relative_model_paths_resolve_against_the_current_directory(llama_trio, tmp_path, monkeypatch):
    """As mergekit: `./base` in a config means ./base under the directory the command runs in, not
    beside the config file (docs/config.md says so)."""
    b, f1, _ = llama_trio
    work = tmp_path / "work"
    (work / "configs").mkdir(parents=True)
    shutil.copytree(b, work / "base")
    shutil.copytree(f1, work / "ft")
    cfg = work / "configs" / "ta.yml"
    cfg.write_text(
        "merge_method: task_arithmetic\nbase_model: ./base\nmodels:\n"
        "  - model: ./ft\n    parameters: {weight: 1.0}\n"
    )
    monkeypatch.chdir(work)
    out = mergesmith.merge(cfg, tmp_path / "out", quiet=True)
    assert (out / "model.safetensors").is_file()
    monkeypatch.chdir(work / "configs")  # beside the config there is no ./base
    assert main(["plan", str(cfg), "--summary"]) == 2
    text = (ROOT / "docs" / "config.md").read_text()
    assert re.search(r"relative path .* is resolved against the current directory", text, re.S)


def test_skill_models_are_float16_as_documented():
    for f in sorted((ROOT / "examples" / "skills" / "models").glob("*/model.safetensors")):
        with safe_open(f, "pt") as h:
            assert {h.get_slice(k).get_dtype() for k in h.keys()} == {"F16"}, f
    text = (ROOT / "docs" / "skills.md").read_text()
    assert "`model.safetensors` in float16" in text and "in float32," not in text
