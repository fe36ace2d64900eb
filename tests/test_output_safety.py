"""Outputs are precious: one writer per OUT, --overwrite replaces only an output, the commit survives a
kill at any point, a full disk leaves nothing, permissions follow the umask, cards publish no paths."""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import mergesmith
from mergesmith.cli import main
from mergesmith.core import write
from mergesmith.core.errors import MergeError

SRC = str(Path(mergesmith.__file__).parents[1])


def passthrough(model: Path) -> dict:
    return {"merge_method": "passthrough", "models": [{"model": str(model)}]}


def linear(*models: Path) -> dict:
    return {
        "merge_method": "linear",
        "models": [{"model": str(m), "parameters": {"weight": 1.0}} for m in models],
    }


def digest(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` (hidden ones too) -> its SHA-256."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def hidden(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def cli(args: list, capsys) -> tuple[int, str]:
    capsys.readouterr()
    code = main([str(a) for a in args])
    return code, capsys.readouterr().err


@pytest.fixture(scope="module")
def outputs(llama_trio, tmp_path_factory):
    """Two reference outputs: OLD (passthrough of the base) and NEW (linear of the fine-tunes)."""
    base, ft1, ft2 = llama_trio
    root = tmp_path_factory.mktemp("ref")
    old = mergesmith.merge(passthrough(base), root / "old" / "out", quiet=True)  # named as the tests' OUT:
    new = mergesmith.merge(linear(ft1, ft2), root / "new" / "out", quiet=True)  # the card's title is its name
    return digest(old), digest(new)


def script(body: str) -> list[str]:
    return [sys.executable, "-c", textwrap.dedent(body)]


def run_py(body: str, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": SRC}
    return subprocess.run(script(body), capture_output=True, text=True, env=env, timeout=120, **kw)


# --- one writer per output -----------------------------------------------------------------------------


def test_second_writer_is_refused_while_the_first_holds_the_lock(llama_trio, tmp_path, outputs):
    _, ft1, ft2 = llama_trio
    out, ready, go = tmp_path / "out", tmp_path / "ready", tmp_path / "go"
    first = subprocess.Popen(
        script(f"""
            import os, time, mergesmith
            from pathlib import Path
            def wait(folder):
                Path({str(ready)!r}).write_text("x")
                while not Path({str(go)!r}).exists():
                    time.sleep(0.02)
            mergesmith.merge({linear(ft1, ft2)!r}, {str(out)!r}, quiet=True, before_commit=wait)
        """),
        env={**os.environ, "PYTHONPATH": SRC},
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.time() + 60
        while not ready.exists():
            assert first.poll() is None, first.stderr.read()
            assert time.time() < deadline
            time.sleep(0.05)
        cfg = tmp_path / "c.yml"
        cfg.write_text(yaml.safe_dump(passthrough(llama_trio[0])))
        second = subprocess.run(
            [sys.executable, "-m", "mergesmith", "merge", str(cfg), str(out), "--overwrite"],
            capture_output=True,
            text=True,
            env={**os.environ, "PYTHONPATH": SRC},
        )
        assert second.returncode == 2
        assert second.stderr.count("\n") == 1
        assert f"being written by another mergesmith run (pid {first.pid})" in second.stderr
        with pytest.raises(MergeError, match="being written by another mergesmith run"):
            mergesmith.merge(passthrough(llama_trio[0]), out, quiet=True, overwrite=True)
    finally:
        go.write_text("x")
        assert first.wait(60) == 0
    assert digest(out) == outputs[1]  # the first run's output, whole
    assert hidden(tmp_path) == []  # no lock file, no partial folder


def test_lock_file_of_a_killed_run_is_reused_and_removed(llama_trio, tmp_path):
    out = tmp_path / "out"
    (tmp_path / ".out.mergesmith-lock").write_text("12345\n")  # left by a kill -9: nobody holds it
    mergesmith.merge(passthrough(llama_trio[0]), out, quiet=True)
    assert hidden(tmp_path) == [] and (out / "config.json").is_file()


# --- kill -9 at every phase of the commit ---------------------------------------------------------------

KILL = "import os, signal\ndef die(*a, **k):\n    os.kill(os.getpid(), signal.SIGKILL)\n"
PHASES = {
    # while the shards are being written
    "writing": "write.ShardedWriter.write = die",
    # the new output is complete, the exchange has not happened
    "before_exchange": "write._exchange = die",
    # swapped: OUT is the new output, the old tree (and a marker in OUT) are still there
    "after_exchange": "real = write._exchange\n"
    "def swap(a, b):\n    real(a, b)\n    die()\nwrite._exchange = swap",
    # the old tree is half removed
    "during_cleanup": "def half(folder):\n"
    "    os.unlink(next(p for p in folder.iterdir() if p.name.endswith('.json')))\n    die()\n"
    "write._remove_tree = half",
    # no rename-exchange: killed between the two renames, OUT does not exist
    "between_renames": "write._exchange = lambda a, b: False\nreal = os.rename\n"
    "def rename(a, b):\n    real(a, b)\n    if str(b).endswith('.old'):\n        die()\n"
    "os.rename = rename",
    # no rename-exchange: killed after the second rename
    "after_renames": "write._exchange = lambda a, b: False\nreal = os.rename\n"
    "def rename(a, b):\n    real(a, b)\n    if str(a).endswith('.partial'):\n        die()\n"
    "os.rename = rename",
}


@pytest.mark.parametrize("phase", sorted(PHASES))
def test_kill_at_any_phase_leaves_old_or_new_and_the_rerun_cleans_up(
    llama_trio, tmp_path, outputs, phase, capsys
):
    base, ft1, ft2 = llama_trio
    old, new = outputs
    out = tmp_path / "out"
    mergesmith.merge(passthrough(base), out, quiet=True)
    killed = run_py(
        KILL
        + "from mergesmith.core import write\n"
        + PHASES[phase]
        + f"\nimport mergesmith\nmergesmith.merge({linear(ft1, ft2)!r}, {str(out)!r}, quiet=True, overwrite=True)\n"
    )
    assert killed.returncode == -9, killed.stderr
    visible = digest(out) if out.exists() else {}
    visible.pop(write.MARKER, None)  # a marker inside OUT is a leftover the rerun removes
    if phase == "between_renames":
        assert not out.exists()  # the one window without OUT: the rerun puts the old output back
    else:
        assert visible in (old, new), phase
    assert hidden(tmp_path), "the kill should have left something for the rerun to clean up"
    # a rerun that fails early still recovers OUT and cleans up first
    with pytest.raises(MergeError, match="already exists"):
        mergesmith.merge(passthrough(base), out)
    err = capsys.readouterr().err
    assert "interrupted runs" in err or "put back" in err or phase in ("after_exchange", "before_exchange")
    assert digest(out) in (old, new) and hidden(tmp_path) == []
    if phase == "between_renames":
        assert digest(out) == old
    mergesmith.merge(linear(ft1, ft2), out, quiet=True, overwrite=True)
    assert digest(out) == new and hidden(tmp_path) == []


def test_kill_of_a_first_write_leaves_no_out_and_the_partial_is_removed(llama_trio, tmp_path, capsys):
    out = tmp_path / "out"
    killed = run_py(
        KILL
        + "from mergesmith.core import write\nwrite.ShardedWriter.write = die\nimport mergesmith\n"
        + f"mergesmith.merge({passthrough(llama_trio[0])!r}, {str(out)!r}, quiet=True)\n"
    )
    assert killed.returncode == -9 and not out.exists()
    (partial,) = [p for p in tmp_path.iterdir() if p.name.endswith(".partial")]
    assert (partial / write.MARKER).is_file()
    mergesmith.merge(passthrough(llama_trio[0]), out)
    err = capsys.readouterr().err
    assert "removed 1 folder(s) left beside" in err and "KiB" in err
    assert hidden(tmp_path) == [] and (out / "model.safetensors").is_file()


def test_folders_without_the_marker_are_never_removed(llama_trio, tmp_path):
    mine = tmp_path / ".out.mine.partial"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    mergesmith.merge(passthrough(llama_trio[0]), tmp_path / "out", quiet=True)
    assert (mine / "notes.txt").read_text() == "mine"


# --- --overwrite deletes only what it should -----------------------------------------------------------


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {
        str(p.relative_to(root)): (p.lstat().st_size, p.lstat().st_mtime_ns) for p in sorted(root.rglob("*"))
    }


@pytest.fixture
def workspace(llama_trio, tmp_path):
    """tmp_path/models/{base,ft} (copies), tmp_path/work (cwd candidate), tmp_path/junk (no model)."""
    models = tmp_path / "models"
    base = shutil.copytree(llama_trio[0], models / "base")
    ft = shutil.copytree(llama_trio[1], models / "ft")
    (tmp_path / "work" / "sub").mkdir(parents=True)
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "thesis.tex").write_text("years of work")
    return tmp_path, base, ft


REFUSALS = {
    "cwd": ("work", "work", "is the current folder"),
    "parent_of_cwd": ("work", "work/sub", "a parent of the current folder"),
    "dot": (".", "work", "is the current folder"),
    "dotdot": ("..", "work/sub", "a parent of the current folder"),
    "root": ("/", "work", "contains the input"),
    "input_base": ("models/base", None, "is the input"),
    "input_ft": ("models/ft", None, "is the input"),
    "contains_input": ("models", None, "contains the input"),
    "inside_input": ("models/base/sub", None, "is inside the input"),
    "not_a_model": ("junk", None, "does not hold a model"),
}


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_overwrite_refusals_are_one_line_and_touch_nothing(workspace, monkeypatch, capsys, case):
    root, base, ft = workspace
    dest, cwd, message = REFUSALS[case]
    (root / "work" / "config.json").write_text("{}")  # looks like a model: only the cwd rule protects it
    if cwd:
        monkeypatch.chdir(root / cwd)
    cfg = root / "c.yml"
    cfg.write_text(yaml.safe_dump(linear(base, ft)))
    before = snapshot(root)
    code, err = cli(["merge", cfg, dest if dest in (".", "..", "/") else root / dest, "--overwrite"], capsys)
    assert code == 2 and err.count("\n") == 1 and message in err, err
    assert snapshot(root) == before


def test_force_replaces_a_folder_that_holds_no_model(workspace, capsys):
    root, base, ft = workspace
    cfg = root / "c.yml"
    cfg.write_text(yaml.safe_dump(linear(base, ft)))
    code, err = cli(["merge", cfg, root / "junk", "--force"], capsys)  # --force alone is not --overwrite
    assert code == 2 and "already exists; pass --overwrite" in err
    code, err = cli(["merge", cfg, root / "junk", "--overwrite", "--force"], capsys)
    assert code == 0, err
    assert not (root / "junk" / "thesis.tex").exists() and (root / "junk" / "config.json").is_file()


@pytest.mark.parametrize("kind", ["file", "symlink", "dangling"])
def test_out_that_is_a_file_or_symlink_is_refused(workspace, capsys, kind):
    root, base, ft = workspace
    out = root / "out"
    if kind == "file":
        out.write_text("x")
    else:
        out.symlink_to(root / "models" / "base" if kind == "symlink" else root / "nowhere")
    cfg = root / "c.yml"
    cfg.write_text(yaml.safe_dump(linear(base, ft)))
    before = snapshot(root)
    code, err = cli(["merge", cfg, out, "--overwrite", "--force"], capsys)
    assert code == 2 and err.count("\n") == 1
    assert ("not a folder" if kind == "file" else "symbolic link") in err
    assert snapshot(root) == before


def test_lora_adapter_inputs_are_protected(llama_trio, tmp_path, capsys):
    base, ft1, _ = llama_trio
    adapter = tmp_path / "adapter"
    assert main(["extract-lora", "--base", str(base), "--model", str(ft1), "--rank", "2", str(adapter)]) == 0
    with pytest.raises(MergeError, match="is the input"):
        mergesmith.merge(passthrough(f"{base}+{adapter}"), adapter, overwrite=True, force=True)
    assert (adapter / "adapter_config.json").is_file()


def test_every_command_refuses_to_replace_its_input(workspace, capsys):
    root, base, ft = workspace
    moe = root / "moe.yml"
    moe.write_text(
        yaml.safe_dump(
            {
                "base_model": str(base),
                "gate_mode": "random",
                "experts": [{"source_model": str(base)}, {"source_model": str(ft)}],
            }
        )
    )
    before = snapshot(root)
    commands = [
        ["moe", moe, ft, "--overwrite"],
        ["extract-lora", "--base", base, "--model", ft, "--rank", "2", ft, "--overwrite"],
        ["bitnet", ft, ft, "--overwrite"],
    ]
    for args in commands:
        code, err = cli(args, capsys)
        assert code == 2 and err.count("\n") == 1 and "is the input" in err, (args, err)
    assert snapshot(root) == before
    # and each still writes its output once, then needs --overwrite
    fresh = [
        ["moe", moe, root / "o-moe"],
        ["extract-lora", "--base", base, "--model", ft, "--rank", "2", root / "o-lora"],
        ["bitnet", ft, root / "o-bitnet"],
    ]
    for args in fresh:
        code, err = cli(args, capsys)
        assert code == 0, (args, err)
        assert any((args[-1] / f).is_file() for f in ("config.json", "adapter_config.json"))
        code, err = cli(args, capsys)
        assert code == 2 and err.count("\n") == 1 and "already exists; pass --overwrite" in err
    assert hidden(root) == []


@st.composite
def layouts(draw):
    """A random folder tree, some of its folders inputs (some given through a symlink), one OUT, a cwd."""
    n = draw(st.integers(2, 7))
    parents = [None] + [draw(st.integers(0, i - 1)) for i in range(1, n)]
    inputs = draw(st.sets(st.integers(0, n - 1), min_size=1, max_size=3))
    via_link = draw(st.sets(st.sampled_from(sorted(inputs))))
    out = draw(st.integers(0, n))  # n: a new folder beside the tree
    exists_model = draw(st.booleans())
    cwd = draw(st.integers(0, n - 1))
    overwrite, force = draw(st.booleans()), draw(st.booleans())
    return parents, inputs, via_link, out, exists_model, cwd, overwrite, force


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(layouts())
def test_destination_check_matches_the_rules(monkeypatch, case):
    parents, inputs, via_link, out, model, cwd, overwrite, force = case
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        paths: list[Path] = []
        for i, p in enumerate(parents):
            paths.append((root / "t" if p is None else paths[p]) / f"d{i}")
            paths[-1].mkdir(parents=True)
            (paths[-1] / ("config.json" if model else "notes.txt")).write_text("{}")
        given_inputs = []
        for i in inputs:
            if i in via_link:
                link = root / f"link{i}"
                link.symlink_to(paths[i])
                given_inputs.append(link)
            else:
                given_inputs.append(paths[i])
        dest = root / "new" if out == len(paths) else paths[out]
        monkeypatch.chdir(paths[cwd])

        def related(a: Path, b: Path) -> bool:
            return a == b or a in b.parents or b in a.parents

        expected = None
        if any(related(dest, paths[i]) for i in inputs):
            expected = "input"
        elif dest.exists() and (dest == paths[cwd] or dest in paths[cwd].parents):
            expected = "current folder"
        elif dest.exists() and not overwrite:
            expected = "already exists"
        elif dest.exists() and not force and not model:
            expected = "does not hold a model"
        if expected is None:
            write.check_destination(dest, overwrite=overwrite, force=force, inputs=given_inputs)
        else:
            with pytest.raises(MergeError, match=expected):
                write.check_destination(dest, overwrite=overwrite, force=force, inputs=given_inputs)
        monkeypatch.chdir(root.parent)


# --- full disk -----------------------------------------------------------------------------------------


def _enospc(*_a, **_k):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _fail_on(name: str, real):
    def patched(path, *a, **k):
        if Path(path).name == name:
            _enospc()
        return real(path, *a, **k)

    return patched


def inject(monkeypatch, phase: str) -> None:
    if phase == "preallocate":
        monkeypatch.setattr(os, "posix_fallocate", _enospc)
    elif phase == "pwrite":
        real = write._pwrite_all
        monkeypatch.setattr(
            write, "_pwrite_all", lambda fd, data, pos: _enospc() if pos else real(fd, data, pos)
        )
    elif phase == "index":
        monkeypatch.setattr(write, "write_json", _fail_on(write.INDEX_NAME, write.write_json))
    elif phase == "config":
        monkeypatch.setattr("mergesmith.pipeline.run.write_json", _fail_on("config.json", write.write_json))
    elif phase == "tokenizer":
        monkeypatch.setattr("mergesmith.pipeline.run.copy_files", _enospc)
    elif phase == "card":
        real = Path.write_text
        monkeypatch.setattr(
            Path, "write_text", lambda p, *a, **k: _enospc() if p.name == "README.md" else real(p, *a, **k)
        )
    elif phase == "commit":
        monkeypatch.setattr(write, "_exchange", _enospc)


@pytest.mark.parametrize("phase", ["preallocate", "pwrite", "index", "config", "tokenizer", "card", "commit"])
@pytest.mark.parametrize("existing", [False, True])
def test_disk_full_at_any_phase_is_one_line_and_leaves_nothing(
    llama_trio, tmp_path, monkeypatch, outputs, phase, existing
):
    base, ft1, ft2 = llama_trio
    out = tmp_path / "out"
    if existing:
        mergesmith.merge(passthrough(base), out, quiet=True)
    elif phase == "commit":
        monkeypatch.setattr(os, "rename", _enospc)
    fds = open_fds()
    inject(monkeypatch, phase)
    with pytest.raises(MergeError) as info:
        mergesmith.merge(linear(ft1, ft2), out, quiet=True, overwrite=True, out_shard_size="40K")
    monkeypatch.undo()
    msg = str(info.value)
    assert "\n" not in msg and "disk full" in msg and "free" in msg and "needed" in msg, msg
    assert open_fds() == fds
    assert hidden(tmp_path) == []
    if existing:
        assert digest(out) == outputs[0]
    else:
        assert not out.exists()


@pytest.mark.parametrize("code", [errno.EDQUOT, errno.EROFS, errno.EACCES])
def test_other_refusals_of_the_file_system_are_one_line(llama_trio, tmp_path, monkeypatch, code):
    def refuse(*_a, **_k):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr("mergesmith.pipeline.run.copy_files", refuse)
    with pytest.raises(MergeError) as info:
        mergesmith.merge(passthrough(llama_trio[0]), tmp_path / "out", quiet=True)
    words = {errno.EDQUOT: "quota", errno.EROFS: "read-only", errno.EACCES: "permission denied"}
    assert words[code] in str(info.value) and "\n" not in str(info.value)
    assert list(tmp_path.iterdir()) == []


def test_free_space_is_checked_before_preallocating(llama_trio, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(os, "posix_fallocate", lambda *a: calls.append(a))
    monkeypatch.setattr(write, "free_space", lambda path: (100_000, 4096))
    with pytest.raises(
        MergeError, match=r"it needs \d+\.\d KiB \(plus 4\.0 KiB kept free\), 97\.7 KiB is free"
    ):
        mergesmith.merge(linear(*llama_trio[1:]), tmp_path / "out", quiet=True)
    assert calls == [] and list(tmp_path.iterdir()) == []


@pytest.fixture
def tmpfs(tmp_path):
    """A small tmpfs mounted for the test (needs the right to mount; skipped only where it is refused)."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    mounted = []

    def mount(size: str) -> Path:
        if mounted:
            subprocess.run(["umount", str(mnt)], check=True)
        r = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)], capture_output=True
        )
        if r.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode().strip()}")
        mounted.append(1)
        return mnt

    yield mount
    if mounted:
        subprocess.run(["umount", str(mnt)], check=True)


def test_real_full_disk_on_a_small_tmpfs(llama_trio, tmp_path, tmpfs):
    base, ft1, ft2 = llama_trio
    weights = sum(f.stat().st_size for f in ft1.glob("*.safetensors"))
    big = tmp_path / "big-tokenizer"  # weights fit, the tokenizer copy does not
    shutil.copytree(ft1, big)
    (big / "tokenizer.json").write_bytes(b"{" + b" " * (3 * weights) + b"}")
    cfg = {**linear(big, ft2), "tokenizer_source": str(big)}
    mnt = tmpfs(f"{weights * 2 // 1024}k")
    fds = open_fds()
    with pytest.raises(MergeError, match="disk full .*needed .* free"):  # at the tokenizer copy
        mergesmith.merge(cfg, mnt / "out", quiet=True)
    assert list(mnt.iterdir()) == [] and open_fds() == fds
    with pytest.raises(MergeError, match="not enough disk space .* needs"):  # before preallocating
        mergesmith.merge({**linear(ft1, ft2), "out_dtype": "float64"}, mnt / "out", quiet=True)
    assert list(mnt.iterdir()) == []
    mnt = tmpfs(f"{weights * 4 // 1024}k")
    out = mergesmith.merge(linear(ft1, ft2), mnt / "out", quiet=True)
    assert (out / "model.safetensors").is_file() and [p.name for p in mnt.iterdir()] == ["out"]


# --- permissions ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_permissions_follow_the_umask(llama_trio, tmp_path, umask):
    old = os.umask(umask)
    try:
        out = mergesmith.merge(linear(*llama_trio[1:]), tmp_path / "out", quiet=True)
        replaced = mergesmith.merge(passthrough(llama_trio[0]), out, quiet=True, overwrite=True)
    finally:
        os.umask(old)
    for folder in (out, replaced):
        assert folder.stat().st_mode & 0o777 == 0o777 & ~umask
        files = list(folder.iterdir())
        assert files and all(f.stat().st_mode & 0o777 == 0o666 & ~umask for f in files), [
            (f.name, oct(f.stat().st_mode)) for f in files
        ]


# --- cards ---------------------------------------------------------------------------------------------


def test_card_quotes_a_hostile_chat_template_and_publishes_no_path(llama_trio, tmp_path):
    base, ft1, ft2 = llama_trio
    hostile = "{{ messages }}\n````\n# Injected heading\n<script>alert(1)</script>\n```\n" + "`" * 7
    cfg = {
        "merge_method": "ties",
        "base_model": str(base),
        "models": [{"model": str(m), "parameters": {"weight": 0.5, "density": 0.5}} for m in (ft1, ft2)],
        "chat_template": hostile,
    }
    out = mergesmith.merge(cfg, tmp_path / "my-merge", quiet=True)
    card = (out / "README.md").read_text()
    assert str(tmp_path) not in card and str(base.parent) not in card
    front = yaml.safe_load(card.split("---")[1])
    assert "base_model" not in front
    assert card.count("# my-merge\n") == 1
    assert (
        "[TIES-Merging: Resolving Interference When Merging Models](https://arxiv.org/abs/2306.01708)" in card
    )
    # the config block's fence is longer than any backtick run in it, so it closes only at its end
    lines = card.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("```") and line.endswith("yaml"))
    fence = lines[start][: -len("yaml")]
    assert len(fence) == 8
    end = next(i for i in range(start + 1, len(lines)) if lines[i].strip() == fence)
    assert end == len(lines) - 1 or all(not line.strip() for line in lines[end + 1 :])
    inside = "\n".join(lines[start + 1 : end])
    assert "# Injected heading" in inside and "<script>" in inside
    assert not any(line.startswith("# Injected") for line in lines[:start] + lines[end + 1 :])
    assert f"`{base.name}`" in card


def test_card_front_matter_lists_only_hub_ids(tmp_path, monkeypatch):
    from mergesmith.pipeline.card import code, display_name, front_matter, public_text

    local = tmp_path / "models" / "my-ft"
    local.mkdir(parents=True)
    refs = ["org/name", "org/other@v2", str(local), f"org/name+{local}", "./rel-missing"]
    front = yaml.safe_load("\n".join(front_matter(refs, ["merge"])[1:-2]))
    assert front["base_model"] == ["org/name", "org/other"]
    assert display_name(str(local)) == "my-ft" and display_name("org/name") == "org/name"
    assert public_text(f"model: {local}\nbase: {local}/\n", refs) == "model: my-ft\nbase: my-ft/\n"
    assert code("a`b") == "``a`b``" and code("`x") == "`` `x ``"


def test_leftovers_of_a_similarly_named_output_are_not_touched(llama_trio, tmp_path):
    other = tmp_path / ".out.b.0123abcd.partial"  # a live partial of OUT "out.b", not of OUT "out"
    other.mkdir()
    (other / write.MARKER).write_text("{}")
    mergesmith.merge(passthrough(llama_trio[0]), tmp_path / "out", quiet=True)
    assert (other / write.MARKER).is_file()


@pytest.mark.parametrize("command", ["extract-lora", "moe"])
def test_other_commands_close_their_files_and_leave_nothing_on_a_full_disk(
    llama_trio, tmp_path, monkeypatch, command
):
    base, ft1, ft2 = llama_trio
    fds = open_fds()
    if command == "extract-lora":
        from mergesmith.lora.extract import extract_lora

        monkeypatch.setattr("mergesmith.lora.extract.write_json", _enospc)
        run = lambda: extract_lora(str(base), str(ft1), tmp_path / "out", rank=2, quiet=True)  # noqa: E731
    else:
        from mergesmith.moe import build_moe

        monkeypatch.setattr("mergesmith.moe.build.copy_files", _enospc)
        cfg = {
            "base_model": str(base),
            "gate_mode": "random",
            "experts": [{"source_model": str(ft1)}, {"source_model": str(ft2)}],
        }
        run = lambda: build_moe(cfg, tmp_path / "out", quiet=True)  # noqa: E731
    with pytest.raises(MergeError, match="disk full") as info:
        run()
    assert "\n" not in str(info.value) and open_fds() == fds and list(tmp_path.iterdir()) == []


def test_a_failed_run_removes_the_parent_folders_it_created(llama_trio, tmp_path, monkeypatch):
    monkeypatch.setattr("mergesmith.pipeline.run.copy_files", _enospc)
    with pytest.raises(MergeError, match="disk full"):
        mergesmith.merge(passthrough(llama_trio[0]), tmp_path / "a" / "b" / "out", quiet=True)
    assert list(tmp_path.iterdir()) == []


def test_every_paper_in_the_methods_doc_is_linked_from_the_card():
    import re

    from mergesmith.methods import get_method
    from mergesmith.pipeline.card import PAPERS

    doc = (Path(__file__).parents[1] / "docs" / "methods.md").read_text()
    cited = {}
    for heading, body in re.findall(r"^#{2,3} ([a-z_, ]+)\n(.*?)(?=^#{2,3} |\Z)", doc, flags=re.M | re.S):
        found = re.search(r"arXiv:(\d{4}\.\d{4,5})", body)
        if found:
            for name in heading.split(", "):
                cited[name.strip()] = found.group(1)
    assert len(cited) >= 15
    assert {name: PAPERS[name][1].rsplit("/", 1)[1] for name in cited} == cited
    assert all(get_method(name).name == name for name in PAPERS)


def test_a_multi_stage_merge_follows_the_same_output_rules(llama_trio, tmp_path):
    base, ft1, ft2 = llama_trio
    stages = [
        {"name": "soup", **linear(ft1, ft2)},
        {
            "merge_method": "slerp",
            "base_model": str(base),
            "models": [{"model": str(base)}, {"model": "soup"}],
            "parameters": {"t": 0.5},
        },
    ]
    out = tmp_path / "junk"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(MergeError, match="does not hold a model"):
        mergesmith.merge(stages, out, quiet=True, overwrite=True)
    with pytest.raises(MergeError, match="is the input"):
        mergesmith.merge(stages, ft1, quiet=True, overwrite=True, force=True)
    assert (out / "notes.txt").is_file() and sorted(p.name for p in tmp_path.iterdir()) == ["junk"]
    write.acquire_lock(write._absolute(out))  # another thread's (or process's) run holds OUT
    try:
        import threading

        errors = []
        t = threading.Thread(
            target=lambda: errors.append(_catch(lambda: mergesmith.merge(stages, out, quiet=True)))
        )
        t.start()
        t.join()
        assert "being written by another mergesmith run" in errors[0]
    finally:
        write.release_lock(write._absolute(out))
    mergesmith.merge(stages, out, quiet=True, overwrite=True, force=True)
    assert (out / "config.json").is_file() and not (out / "notes.txt").exists()
    assert hidden(tmp_path) == []


def _catch(fn) -> str:
    try:
        fn()
    except MergeError as exc:
        return str(exc)
    return ""


def test_write_atomic_replaces_or_refuses_and_leaves_no_temporary(tmp_path):
    from mergesmith.core.write import write_atomic

    path = tmp_path / "out.json"
    write_atomic(path, b"one", replace=False)
    assert path.read_bytes() == b"one"
    with pytest.raises(FileExistsError):
        write_atomic(path, b"two", replace=False)
    assert path.read_bytes() == b"one"
    write_atomic(path, b"three")
    assert path.read_bytes() == b"three"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]
