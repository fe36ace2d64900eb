"""Shared fixtures: the shipped skill models, and tiny random Llamas that reuse their tokenizer."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from mergesmith import cli
from tiny_models import make_char_llama

ROOT = Path(__file__).resolve().parents[2]
SKILLS = ROOT / "examples" / "skills"
MODELS = SKILLS / "models"
DATA = SKILLS / "data"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


@pytest.fixture(autouse=True)
def _two_threads() -> None:
    torch.set_num_threads(2)


def make_tiny_llama(folder: Path, *, max_positions: int = 64, seed: int = 0) -> Path:
    """A random two-layer Llama with the skills' character tokenizer, saved like any model folder."""
    return make_char_llama(
        folder, [MODELS / "base" / name for name in TOKENIZER_FILES], max_positions=max_positions, seed=seed
    )


@pytest.fixture
def tiny_llama(tmp_path: Path) -> Path:
    return make_tiny_llama(tmp_path / "tiny")


@pytest.fixture
def tiny_llama_factory() -> Callable[..., Path]:
    return make_tiny_llama


@pytest.fixture
def models_dir() -> Path:
    return MODELS


@pytest.fixture
def data_dir() -> Path:
    return DATA


@pytest.fixture
def run_cli(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]):
    """Run ``mergesmith ...`` in-process with only the eval command registered; returns (code, out, err)."""
    monkeypatch.setattr(cli, "COMMAND_MODULES", ["mergesmith.eval.command"])

    def run(*argv: str) -> tuple[int, str, str]:
        capsys.readouterr()  # drop what fixtures printed while saving models
        code = cli.main(list(argv))
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return run
