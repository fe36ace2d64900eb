"""examples/demo.py (`make demo`): it says what it is doing, step by step, and its table keeps its content."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def demo():
    spec = importlib.util.spec_from_file_location("mergesmith_demo", ROOT / "examples" / "demo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _frames(err: str) -> list[str]:
    return [f.strip() for f in err.replace("\n", "\r").split("\r") if f.strip()]


def test_evaluation_bar_moves_batch_by_batch(demo, capsys):
    from mergesmith.eval import load_tasks

    tasks = []
    for name in ("count", "rev"):
        t = load_tasks(ROOT / "examples" / "skills" / "data" / name / "test.jsonl", name=name)
        tasks.append(type(t)(t.name, t.path, t.prompts[:3], t.answers[:3]))
    scores = demo.evaluate("base", str(ROOT / "examples" / "skills" / "models" / "base"), tasks, "[ 1/1]")
    assert set(scores) == {"count", "rev"} and all(0 <= v <= 1 for v in scores.values())
    frames = _frames(capsys.readouterr().err)
    counts = [m.group(1) for f in frames if (m := re.search(r"\[ 1/1\] evaluating base: .*\| (\d)/6 ", f))]
    assert counts == ["0", "3", "6"]  # drawn at the start and after each task's batch
    assert re.fullmatch(r"\[ 1/1\] evaluated base on 6 prompts in \d+\.\d s", frames[-1])


def test_demo_prints_every_step_then_the_table(demo, tmp_path, capsys, monkeypatch):
    import torch

    monkeypatch.setattr(sys, "argv", ["demo.py", "--out", str(tmp_path / "demo"), "--limit", "2"])
    threads = torch.get_num_threads()
    try:
        assert demo.main() == 0
    finally:
        torch.set_num_threads(threads)  # the demo runs on one thread; the rest of the suite as it was
    captured = capsys.readouterr()
    lines = [f for f in _frames(captured.err) if re.match(r"\[\s*\d+/15\] (evaluated|merged) ", f)]
    assert [int(re.match(r"\[\s*(\d+)", ln).group(1)) for ln in lines] == list(range(1, 16))
    assert all(re.search(r" in \d+\.\d s$", ln) for ln in lines)
    assert [ln.split("] ")[1].split(" ")[1] for ln in lines if "] merged " in ln] == [
        "linear",
        "task_arithmetic",
        "ties",
        "dare_ties",
        "slerp",
    ]
    assert _frames(captured.err)[0].startswith("demo: 5 merges of 4 experts (count, rev, shift, sort)")
    table = captured.out.splitlines()
    assert table[0].split() == ["model", "count", "rev", "shift", "sort", "normalized"]
    assert [ln[:20].strip() for ln in table[2:9]] == [
        "base",
        "expert (own skill)",
        "linear",
        "task_arithmetic",
        "ties",
        "dare_ties",
        "slerp (first two)",
    ]
