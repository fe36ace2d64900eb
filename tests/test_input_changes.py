"""An input file that another program writes to, or replaces, while a command reads it: the output would
mix two versions of the file (or read the new bytes with the old header), a silently wrong model. Such a
run ends with one line and writes nothing; a file replaced after it was opened is read as it was."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

import mergesmith
from mergesmith.core.errors import MergeError
from mergesmith.lora import extract_lora
from mergesmith.pipeline.execute import Executor


@pytest.fixture
def trio(llama_trio, tmp_path) -> tuple[Path, Path, Path]:
    """Copies of the session's models, which these tests change."""
    return tuple(Path(shutil.copytree(m, tmp_path / "in" / m.name)) for m in llama_trio)  # type: ignore[return-value]


def _config(trio) -> dict:
    base, ft1, ft2 = trio
    models = [{"model": str(m), "parameters": {"weight": 0.5}} for m in (ft1, ft2)]
    return {"merge_method": "task_arithmetic", "base_model": str(base), "models": models}


def _write_in_place(path: Path) -> None:
    """Another program rewrites the last bytes of the file (same size)."""
    with open(path, "r+b") as f:
        f.seek(-8, os.SEEK_END)
        f.write(b"\x01" * 8)
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))  # coarse clocks: the change shows


def _replace(path: Path) -> None:
    """Another program writes a new version beside it and renames it over the file (a download, a save)."""
    tmp = path.with_name(path.name + ".new")
    shutil.copyfile(path, tmp)
    os.replace(tmp, path)


def _during_first_tensor(monkeypatch, change) -> None:
    produce = Executor.produce
    done = []

    def changed_after_first(self, t):
        produce(self, t)
        if not done:
            done.append(t.name)
            change()

    monkeypatch.setattr(Executor, "produce", changed_after_first)


def test_a_file_written_to_during_the_merge_writes_nothing(trio, tmp_path, monkeypatch):
    weights = trio[1] / "model.safetensors"
    _during_first_tensor(monkeypatch, lambda: _write_in_place(weights))
    with pytest.raises(MergeError, match="changed while it was being read") as info:
        mergesmith.merge(_config(trio), tmp_path / "out", quiet=True, workers=1)
    assert "\n" not in str(info.value) and "model.safetensors" in str(info.value)
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".out*"))


def test_a_file_replaced_before_it_was_opened_writes_nothing(trio, tmp_path, monkeypatch):
    """The header was read from the old file, the bytes would come from the new one."""
    run = Executor.run

    def replaced_first(self, progress=None):
        _replace(trio[2] / "model.safetensors")
        return run(self, progress)

    monkeypatch.setattr(Executor, "run", replaced_first)
    with pytest.raises(MergeError, match="changed while it was being read"):
        mergesmith.merge(_config(trio), tmp_path / "out", quiet=True)
    assert not (tmp_path / "out").exists()


def test_a_file_replaced_after_it_was_opened_is_read_as_it_was(trio, tmp_path, monkeypatch):
    expected = mergesmith.merge(_config(trio), tmp_path / "expected", quiet=True)
    _during_first_tensor(monkeypatch, lambda: [_replace(m / "model.safetensors") for m in trio])
    out = mergesmith.merge(_config(trio), tmp_path / "out", quiet=True, workers=1)
    a, b = load_file(expected / "model.safetensors"), load_file(out / "model.safetensors")
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_an_unchanged_rerun_is_not_refused(trio, tmp_path):
    """The stamps do not drift on their own (a file merely read, or its page cache dropped)."""
    mergesmith.merge(_config(trio), tmp_path / "one", quiet=True)
    fd = os.open(trio[1] / "model.safetensors", os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    mergesmith.merge(_config(trio), tmp_path / "two", quiet=True)


def test_extract_lora_refuses_a_model_written_to_meanwhile(trio, tmp_path, monkeypatch):
    from mergesmith.lora import extract

    weights = trio[1] / "model.safetensors"
    factorise = extract.factorise
    done = []

    def changed_after_first(delta, rank):
        if not done:
            done.append(1)
            _write_in_place(weights)
        return factorise(delta, rank)

    monkeypatch.setattr(extract, "factorise", changed_after_first)
    with pytest.raises(MergeError, match="changed while it was being read"):
        extract_lora(base=str(trio[0]), model=str(trio[1]), out_dir=tmp_path / "lora", rank=2, quiet=True)
    assert not (tmp_path / "lora").exists()
