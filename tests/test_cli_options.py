"""--device and --workers: refused with one line and exit code 2 by every command that has them, and by
the Python APIs, before anything is written."""

from __future__ import annotations

import argparse
import inspect
from pathlib import Path

import pytest

import mergesmith
from mergesmith.cli import main
from mergesmith.core.cliargs import check_workers, positive_int
from mergesmith.core.devices import check_device
from mergesmith.core.errors import MergeError
from mergesmith.pipeline.run import exec_options


def _configs(tmp_path: Path, trio) -> dict[str, Path]:
    b, f1, f2 = trio
    merge_cfg = tmp_path / "ties.yml"
    merge_cfg.write_text(
        f"merge_method: ties\nbase_model: {b}\nmodels:\n"
        f"  - model: {f1}\n    parameters: {{weight: 1.0, density: 0.5}}\n"
        f"  - model: {f2}\n    parameters: {{weight: 1.0, density: 0.5}}\n"
    )
    moe_cfg = tmp_path / "moe.yml"
    moe_cfg.write_text(
        f"base_model: {b}\ngate_mode: random\nexperts_per_token: 1\nexperts:\n"
        f"  - source_model: {f1}\n  - source_model: {f2}\n"
    )
    return {"merge": merge_cfg, "moe": moe_cfg}


def _commands(tmp_path: Path, trio) -> dict[str, list[str]]:
    """Every command with a --device option, ready to take one."""
    b, f1, _ = trio
    cfg = _configs(tmp_path, trio)
    out = str(tmp_path / "out")
    return {
        "merge": ["merge", str(cfg["merge"]), out, "--quiet"],
        "plan": ["plan", str(cfg["merge"])],
        "moe": ["moe", str(cfg["moe"]), out, "--quiet"],
        "extract-lora": ["extract-lora", out, "--base", str(b), "--model", str(f1), "--rank", "2", "--quiet"],
    }


def _one_line_refusal(argv: list[str], capsys, *needles: str) -> None:
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's refusals exit from parse_args
        code = exc.code
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert code == 2, captured.err
    assert len(lines) == 1 and "Traceback" not in captured.err, captured.err
    for needle in needles:
        assert needle in lines[0]
    assert captured.out == ""


def _missing_gpu() -> str:
    """A CUDA device this machine does not have: 'cuda' without a GPU, else one past the last GPU."""
    import torch

    return "cuda" if not torch.cuda.is_available() else f"cuda:{torch.cuda.device_count()}"


@pytest.mark.parametrize("command", ["merge", "plan", "moe", "extract-lora"])
def test_unknown_device_is_one_line_in_every_command(command, llama_trio, tmp_path, capsys):
    argv = _commands(tmp_path, llama_trio)[command]
    _one_line_refusal([*argv, "--device", "cdua"], capsys, "unknown device 'cdua'", "cpu, cuda, cuda:N")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("command", ["merge", "plan", "moe", "extract-lora"])
def test_missing_gpu_is_one_line_in_every_command(command, llama_trio, tmp_path, capsys):
    argv = _commands(tmp_path, llama_trio)[command]
    _one_line_refusal([*argv, "--device", _missing_gpu()], capsys, "CUDA GPU")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("command", ["merge", "plan", "moe"])
@pytest.mark.parametrize("workers", ["0", "-3", "two"])
def test_bad_workers_is_one_line_in_every_command(command, workers, llama_trio, tmp_path, capsys):
    argv = _commands(tmp_path, llama_trio)[command]
    _one_line_refusal([*argv, f"--workers={workers}"], capsys, "argument --workers", "at least 1")
    assert not (tmp_path / "out").exists()


def test_valid_devices_pass_through():
    assert check_device("cpu") == "cpu"
    assert check_device(" CPU ") == "cpu"
    for bad in ("cdua", "gpu", "cuda:", "cuda:x", "cuda0", ""):
        with pytest.raises(MergeError, match="unknown device"):
            check_device(bad)
    with pytest.raises(MergeError, match="CUDA GPU"):
        check_device(_missing_gpu())


def test_positive_int_type():
    assert positive_int("1") == 1 and positive_int("12") == 12
    for bad in ("0", "-1", "1.5", "", "x"):
        with pytest.raises(argparse.ArgumentTypeError):
            positive_int(bad)
    assert check_workers(None) is None and check_workers(3) == 3
    for bad in (0, -1, True, 1.5):
        with pytest.raises(MergeError, match="--workers"):
            check_workers(bad)  # type: ignore[arg-type]


def test_python_apis_check_device_and_workers(llama_trio, tmp_path):
    from mergesmith.lora.extract import extract_lora
    from mergesmith.moe import build_moe

    b, f1, _ = llama_trio
    cfg = _configs(tmp_path, llama_trio)
    out = tmp_path / "out"
    for kwargs in ({"workers": 0}, {"workers": -1}, {"device": "cdua"}):
        with pytest.raises(MergeError):
            exec_options(**kwargs)
        with pytest.raises(MergeError):
            mergesmith.merge(cfg["merge"], out, quiet=True, **kwargs)
        with pytest.raises(MergeError):
            build_moe(cfg["moe"], out, quiet=True, **kwargs)
    with pytest.raises(MergeError, match="unknown device"):
        extract_lora(str(b), str(f1), out, rank=2, device="cdua", quiet=True)
    assert not out.exists()


def test_moe_default_workers_is_auto(llama_trio, tmp_path, monkeypatch):
    """moe's default is the merge's (auto), not a fixed 2: the build asks default_workers()."""
    import mergesmith.moe.build as build

    seen = []
    real = build._bounded_map
    monkeypatch.setattr(build, "default_workers", lambda: 3)
    monkeypatch.setattr(
        build, "_bounded_map", lambda fn, items, workers: seen.append(workers) or real(fn, items, workers)
    )
    build.build_moe(_configs(tmp_path, llama_trio)["moe"], tmp_path / "out", quiet=True)
    assert seen == [3]


def _subcommands() -> dict[str, argparse.ArgumentParser]:
    from mergesmith.cli import build_parser

    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_every_command_has_the_same_handler_and_shared_flags():
    commands = _subcommands()
    assert set(commands) == {
        "merge",
        "plan",
        "eval",
        "extract-lora",
        "bitnet",
        "moe",
        "inspect",
        "tokensurgeon",
        "search",
    }
    for name, sub in commands.items():
        flags = {s: a for a in sub._actions for s in a.option_strings}
        assert {"-q", "--quiet", "-v", "--verbose"} <= set(flags), name
        func = sub.get_default("func")
        assert func.__name__ == "run" and list(inspect.signature(func).parameters) == ["args"], name
        if "--workers" in flags:
            assert flags["--workers"].default is None, f"{name}: --workers defaults to auto"
        if "--overwrite" in flags and name != "inspect":  # inspect replaces files it is named, never a folder
            assert "--force" in flags, name
    writes = {"merge", "extract-lora", "bitnet", "moe", "tokensurgeon"}
    assert {n for n, s in commands.items() if "--force" in s._option_string_actions} == writes
    assert {n for n, s in commands.items() if "--overwrite" in s._option_string_actions} == writes | {
        "inspect"
    }
