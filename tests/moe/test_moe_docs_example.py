"""docs/moe.md's calibrated example, on the shipped skill models: it routes its own prompts, and the
version it replaced (generic prompts the character tokenizer cannot read, and a negative prompt) warns."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import yaml

from mergesmith.moe import build_moe

ROOT = Path(__file__).resolve().parents[2]
OLD_EXAMPLE = """
base_model: examples/skills/models/base
gate_mode: calibrated
experts_per_token: 2
dtype: bfloat16
experts:
  - source_model: examples/skills/models/count
    positive_prompts: ["add: 12+34=", "What is 17 times 3?"]
  - source_model: examples/skills/models/rev
    positive_prompts: ["def fibonacci(n):", "Write a Python function that"]
    negative_prompts: ["Once upon a time"]
"""


def _doc_example() -> dict:
    text = (ROOT / "docs" / "moe.md").read_text()
    block = re.search(r"```yaml\n(.*?)```", text, re.S)
    assert block is not None
    return yaml.safe_load(block.group(1))


def _chance_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "no better than chance" in r.getMessage()]


def test_docs_example_routes_its_prompts(tmp_path, monkeypatch, caplog):
    monkeypatch.chdir(ROOT)  # the example's paths are relative to the repository's root
    cfg = _doc_example()
    assert cfg["gate_mode"] == "calibrated" and len(cfg["experts"]) == 2
    with caplog.at_level(logging.WARNING, logger="mergesmith.moe"):
        result = build_moe(cfg, tmp_path / "moe", quiet=True)
    assert not _chance_warnings(caplog)
    assert [r.calibrated.train_accuracy for r in result.reports] == [1.0, 1.0, 1.0]
    assert all(0.9 < r.calibrated.mean_top1 < 0.99 for r in result.reports)  # confident, not one-hot


def test_old_docs_example_warns_and_names_the_negative_prompts(tmp_path, monkeypatch, caplog):
    monkeypatch.chdir(ROOT)
    with caplog.at_level(logging.WARNING, logger="mergesmith.moe"):
        result = build_moe(yaml.safe_load(OLD_EXAMPLE), tmp_path / "moe", quiet=True)
    assert [round(r.calibrated.train_accuracy, 3) for r in result.reports] == [
        0.446
    ] * 3  # prompt and answer tokens
    (line,) = _chance_warnings(caplog)
    assert "layer(s) 0 (0.446), 1 (0.446), 2 (0.446)" in line
    assert "without negative_prompts these layers would route 1.000, 1.000, 1.000" in line
