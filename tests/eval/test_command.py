"""``mergesmith eval`` end to end: table, JSON, and one-line errors with exit code 2."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
MODELS = ROOT / "examples" / "skills" / "models"
DATA = ROOT / "examples" / "skills" / "data"


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_json_output_parses_and_has_every_figure(run_cli, tiny_llama: Path, tmp_path: Path) -> None:
    text = write(tmp_path / "t.txt", "rev: ab=ba\n")
    code, out, err = run_cli(
        "eval", str(MODELS / "rev"), str(tiny_llama),
        "--tasks", str(DATA / "rev" / "test.jsonl"), "--tasks", str(DATA / "shift" / "test.jsonl"),
        "--ppl", str(text), "--limit", "20", "--json", "--quiet",
    )  # fmt: skip
    assert code == 0, err
    assert err == ""
    result = json.loads(out)
    assert [m["model"] for m in result["models"]] == [str(MODELS / "rev"), str(tiny_llama)]
    rev = result["models"][0]
    assert set(rev["tasks"]) == {"rev/test", "shift/test"}
    assert rev["tasks"]["rev/test"]["total"] == 20
    assert rev["tasks"]["rev/test"]["accuracy"] >= 0.85  # the expert scores ~98% on all 500
    assert rev["tasks"]["shift/test"]["accuracy"] <= 0.05
    assert rev["ppl"]["t"] > 1.0


def test_table_has_a_row_per_model_and_a_column_per_task(run_cli, tmp_path: Path) -> None:
    code, out, _ = run_cli(
        "eval", str(MODELS / "base"), str(MODELS / "sort"),
        "--tasks", str(DATA / "sort" / "test.jsonl"), "--limit", "16", "--quiet",
    )  # fmt: skip
    assert code == 0
    header, ruler, *rows = out.strip().splitlines()
    assert header.split() == ["model", "sort/test"]
    assert set(ruler) <= {"-", " "}
    assert [r.split()[0] for r in rows] == [str(MODELS / "base"), str(MODELS / "sort")]
    assert float(rows[1].split()[1]) >= 95.0


def test_progress_bar_goes_to_stderr_unless_quiet(run_cli) -> None:
    args = ["eval", str(MODELS / "count"), "--tasks", str(DATA / "count" / "test.jsonl"), "--limit", "8"]
    code, out, err = run_cli(*args)
    assert code == 0 and "prompt" in err and "%" in err
    assert "%" not in out
    code, _, err = run_cli(*args, "--quiet")
    assert code == 0 and err == ""


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("", "is empty"),
        ('{"prompt": "x", "answer": "y"}\n{"prompt": "x"}\n', r"bad\.jsonl:2: no 'answer' field"),
        ("{oops}\n", r"bad\.jsonl:1: not JSON"),
    ],
)
def test_bad_tasks_file_exits_2_with_one_line(run_cli, tmp_path: Path, content: str, expected: str) -> None:
    bad = write(tmp_path / "bad.jsonl", content)
    code, out, err = run_cli("eval", str(MODELS / "base"), "--tasks", str(bad))
    assert code == 2
    assert out == ""
    assert err.count("\n") == 1 and err.startswith("mergesmith: error: ")
    assert re.search(expected, err)


def test_missing_model_folder_exits_2_before_any_scoring(run_cli, tmp_path: Path) -> None:
    code, _, err = run_cli(
        "eval", str(MODELS / "base"), str(tmp_path / "ghost"), "--tasks", str(DATA / "count" / "test.jsonl")
    )
    assert code == 2
    assert (
        err
        == f"mergesmith: error: model folder {tmp_path / 'ghost'} does not exist; pass a folder written by save_pretrained\n"
    )


def test_missing_inputs_exit_2(run_cli, tmp_path: Path) -> None:
    code, _, err = run_cli("eval", str(MODELS / "base"))
    assert code == 2 and "nothing to evaluate" in err
    code, _, err = run_cli("eval", str(MODELS / "base"), "--ppl", str(tmp_path / "none.txt"))
    assert code == 2 and "none.txt does not exist" in err and err.count("\n") == 1


def test_bad_numbers_exit_2(run_cli) -> None:
    code, _, err = run_cli(
        "eval", str(MODELS / "base"), "--tasks", str(DATA / "count/test.jsonl"), "--batch-size", "0"
    )
    assert code == 2 and "--batch-size must be at least 1" in err


def test_help_describes_the_command(run_cli, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        run_cli("eval", "--help")
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "--tasks FILE.jsonl" in out and "--ppl FILE.txt" in out and "--json" in out


def test_small_models_are_scored_on_one_torch_thread(run_cli, tiny_llama: Path, monkeypatch) -> None:
    """Tiny models gain nothing from a second intra-op thread and lose 4-10x on a busy machine: eval
    scores them on one thread and gives the threads back afterwards."""
    import torch

    from mergesmith.eval import tasks as tasks_module

    seen: list[int] = []
    real = tasks_module.generate_answers

    def spy(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return real(*args, **kwargs)

    monkeypatch.setattr(tasks_module, "generate_answers", spy)
    torch.set_num_threads(2)
    code, _, err = run_cli(
        "eval", str(tiny_llama), "--tasks", str(DATA / "rev" / "test.jsonl"), "--limit", "4", "--quiet"
    )
    assert code == 0, err
    assert seen == [1]
    assert torch.get_num_threads() == 2
