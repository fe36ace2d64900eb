"""Shared fixtures: the shipped skill models, and tiny random Llamas that reuse their tokenizer."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from mergesmith import cli

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
    config = LlamaConfig(
        vocab_size=46,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_positions,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.save_pretrained(folder, safe_serialization=True)
    for name in TOKENIZER_FILES:
        shutil.copy(MODELS / "base" / name, folder / name)
    return folder


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
