"""Multi-stage files: dependency order, by-hand equivalence, skipping unchanged stages, one-line errors."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file, save_file

import mergesmith
from mergesmith.cli import main
from mergesmith.core.errors import ConfigError
from mergesmith.pipeline.stages import MARKER, load_stages, stage_order


def write_stages(path: Path, docs: list[dict]) -> Path:
    path.write_text(yaml.safe_dump_all(docs, sort_keys=False))
    return path


def two_stages(base: Path, ft1: Path, ft2: Path, weight: float = 0.5, t: float = 0.5) -> list[dict]:
    return [
        {
            "name": "soup",
            "merge_method": "linear",
            "models": [
                {"model": str(ft1), "parameters": {"weight": weight}},
                {"model": str(ft2), "parameters": {"weight": 1 - weight}},
            ],
        },
        {
            "merge_method": "slerp",
            "base_model": str(base),
            "models": [{"model": str(base)}, {"model": "soup"}],
            "parameters": {"t": t},
        },
    ]


def output_bytes(folder: Path) -> dict[str, bytes]:
    """What must be byte-identical: the weights and config.json."""
    names = sorted(p.name for p in folder.glob("*.safetensors")) + ["config.json"]
    return {n: (folder / n).read_bytes() for n in names}


def mtimes(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}


@pytest.fixture
def models(llama_trio, tmp_path):
    """Private copies, so tests may edit them."""
    return tuple(shutil.copytree(m, tmp_path / "in" / m.name) for m in llama_trio)


def run(args: list[str], capsys) -> tuple[int, str]:
    capsys.readouterr()
    code = main(args)
    return code, capsys.readouterr().err


def test_two_stages_equal_running_them_by_hand(models, tmp_path):
    base, ft1, ft2 = models
    docs = two_stages(base, ft1, ft2, weight=0.3)
    cfg = write_stages(tmp_path / "stages.yml", docs)
    out = mergesmith.merge(cfg, tmp_path / "out", quiet=True)
    assert out == (tmp_path / "out").absolute()

    first = mergesmith.merge(docs[0], tmp_path / "hand1", quiet=True)
    second_doc = {**docs[1], "models": [{"model": str(base)}, {"model": str(first)}]}
    second = mergesmith.merge(second_doc, tmp_path / "hand2", quiet=True)
    assert output_bytes(out) == output_bytes(second)
    assert output_bytes(tmp_path / "out.stages" / "soup") == output_bytes(first)
    assert json.loads((out / MARKER).read_text())["hash"]


def test_unchanged_stages_are_skipped_and_changes_rerun(models, tmp_path, capsys):
    base, ft1, ft2 = models
    cfg = write_stages(tmp_path / "stages.yml", two_stages(base, ft1, ft2))
    out, inter = tmp_path / "out", tmp_path / "inter"
    args = ["merge", str(cfg), str(out), "--intermediate-dir", str(inter)]
    assert run(args, capsys)[0] == 0
    soup, final = mtimes(inter / "soup"), mtimes(out)

    code, err = run(args, capsys)
    assert code == 0 and "all 2 stages up to date" in err
    assert mtimes(inter / "soup") == soup and mtimes(out) == final

    # only the last stage's config changes: the first is skipped, the last needs --overwrite
    write_stages(cfg, two_stages(base, ft1, ft2, t=0.25))
    code, err = run(args, capsys)
    assert code == 2 and "--overwrite" in err
    code, err = run([*args, "--overwrite"], capsys)
    assert code == 0 and "'soup': up to date, skipped" in err and "(config changed)" in err
    assert mtimes(inter / "soup") == soup and mtimes(out) != final
    final = mtimes(out)

    # an input model changes: both stages run again
    weights = load_file(ft2 / "model.safetensors")
    weights["model.norm.weight"] = weights["model.norm.weight"] + 1
    save_file(weights, ft2 / "model.safetensors", metadata={"format": "pt"})
    code, err = run([*args, "--overwrite"], capsys)
    assert code == 0 and f"input {str(ft2)!r} changed" in err and "input 'soup' changed" in err
    assert mtimes(inter / "soup") != soup and mtimes(out) != final
    soup, final = mtimes(inter / "soup"), mtimes(out)

    # touching a small metadata file does not count as a change; damaging a stage's output does
    (ft1 / "config.json").write_text((ft1 / "config.json").read_text())
    (inter / "soup" / "model.safetensors").write_bytes(b"")
    code, err = run(args, capsys)
    assert (
        code == 0 and "'soup' (its files changed)" in err and "final (unnamed document 2): up to date" in err
    )
    assert mtimes(out) == final


def test_dependency_order_named_final_and_api(models, tmp_path):
    """Documents may come in any order; with every document named, the one nobody uses is the output."""
    base, ft1, ft2 = models
    docs = [
        {
            "name": "top",
            "merge_method": "task_arithmetic",
            "base_model": str(base),
            "models": [
                {"model": "left", "parameters": {"weight": 0.5}},
                {"model": "right", "parameters": {"weight": 0.5}},
            ],
        },
        {
            "name": "left",
            "merge_method": "linear",
            "models": [{"model": str(ft1)}, {"model": "right"}],
            "parameters": {"weight": 0.5},
        },
        {
            "name": "right",
            "merge_method": "slerp",
            "base_model": str(base),
            "models": [{"model": str(ft2)}],
            "parameters": {"t": 0.3},
        },
    ]
    order = [s.name for s in stage_order(load_stages(docs))]
    assert order == ["right", "left", "top"]
    out = mergesmith.merge(
        write_stages(tmp_path / "s.yml", docs), tmp_path / "out", intermediate_dir=tmp_path / "i", quiet=True
    )
    assert sorted(p.name for p in (tmp_path / "i").iterdir()) == ["left", "right"]
    assert (out / "model.safetensors").is_file() and (out / MARKER).is_file()


def test_plan_shows_every_stage_in_order(models, tmp_path, capsys):
    base, ft1, ft2 = models
    cfg = write_stages(tmp_path / "stages.yml", two_stages(base, ft1, ft2))
    capsys.readouterr()
    assert main(["plan", str(cfg)]) == 0
    out = capsys.readouterr().out
    first, second = out.index("## stage 1/2: 'soup'"), out.index("## stage 2/2: final")
    assert first < second
    assert "soup:model.layers.0.mlp.up_proj.weight" in out[second:]  # the later stage reads the planned one
    assert out.count("# 30 tensors") == 2
    assert not (tmp_path / "stages.yml.stages").exists()


BAD = {
    "cycle": ([("a", "b"), ("b", "a")], "cycle: a -> b -> a"),
    "self": ([("a", "a"), (None, "a")], "cycle: a -> a"),
    "unknown": ([("a", None), (None, "aa")], "uses 'aa', which is neither the name of a stage"),
    "duplicate": ([("a", None), ("a", None), (None, "a")], "documents 1 and 2 are both named 'a'"),
    "two unnamed": ([(None, None), (None, None)], "documents 1, 2 have no name"),
    "two outputs": ([("a", None), ("b", None)], "'a', 'b' are not used by any other stage"),
    "bad name": ([("a/b", None), (None, None)], "must be usable as a folder name"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_stage_graphs_are_one_line_errors(case, models, tmp_path, capsys):
    base, ft1, _ = models
    shape, message = BAD[case]
    docs = []
    for name, uses in shape:
        doc = {
            "merge_method": "linear",
            "models": [{"model": str(ft1)}, {"model": uses or str(base)}],
            "parameters": {"weight": 0.5},
        }
        if name:
            doc["name"] = name
        docs.append(doc)
    cfg = write_stages(tmp_path / "s.yml", docs)
    with pytest.raises(ConfigError):
        load_stages(cfg) if case not in ("cycle", "self", "two outputs") else _order(cfg)
    code, err = run(["merge", str(cfg), str(tmp_path / "out")], capsys)
    assert code == 2 and message in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.stages").exists()


def _order(cfg: Path) -> None:
    from mergesmith.pipeline.stages import final_stage

    stages = load_stages(cfg)
    stage_order(stages)
    final_stage(stages)


def test_a_mistake_in_a_later_stage_stops_before_the_first_runs(models, tmp_path, capsys):
    base, ft1, ft2 = models
    docs = two_stages(base, ft1, ft2)
    docs[1]["parameters"] = {"t": 0.5, "dnsity": 0.3}  # no method takes this
    cfg = write_stages(tmp_path / "s.yml", docs)
    code, err = run(["merge", str(cfg), str(tmp_path / "out")], capsys)
    assert code == 2 and "stage final (unnamed document 2)" in err and "density" in err
    assert not (tmp_path / "out.stages").exists()


def test_foreign_folder_in_the_intermediate_dir_is_not_replaced(models, tmp_path, capsys):
    base, ft1, ft2 = models
    cfg = write_stages(tmp_path / "s.yml", two_stages(base, ft1, ft2))
    foreign = tmp_path / "out.stages" / "soup"
    foreign.mkdir(parents=True)
    (foreign / "notes.txt").write_text("mine")
    code, err = run(["merge", str(cfg), str(tmp_path / "out")], capsys)
    assert code == 2 and "not written by a mergesmith stage" in err
    assert (foreign / "notes.txt").read_text() == "mine"
    code, err = run(["merge", str(cfg), str(tmp_path / "out"), "-I", str(tmp_path / "out" / "x")], capsys)
    assert code == 2 and "must not contain each other" in err


def test_folder_identity_of_large_files(models, monkeypatch):
    """Above the whole-file threshold a safetensors file counts by size, mtime and header, not its data."""
    from mergesmith.pipeline import stages

    monkeypatch.setattr(stages, "SMALL_FILE", 0)
    folder = models[1]
    weights = folder / "model.safetensors"
    before = stages.folder_identity(folder)
    stat = weights.stat()
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # one bit of tensor data, same size and header
    weights.write_bytes(bytes(data))
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert stages.folder_identity(folder) == before  # documented blind spot: data is not hashed
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))
    assert stages.folder_identity(folder) != before
