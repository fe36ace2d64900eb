"""Shared fixtures: tiny models (built by tiny_models.py) and a pinned memory baseline."""

from __future__ import annotations

from pathlib import Path

import pytest

from tiny_models import FAMILIES, make_finetune, make_model


@pytest.fixture(scope="session")
def llama_trio(tmp_path_factory) -> tuple[Path, Path, Path]:
    """A tiny Llama base and two fine-tunes of it."""
    root = tmp_path_factory.mktemp("llama")
    base = make_model(root / "base", "llama")
    return base, make_finetune(base, root / "ft1", seed=1), make_finetune(base, root / "ft2", seed=2)


@pytest.fixture(scope="session")
def family_models(tmp_path_factory):
    """family -> (base, fine-tune) for every tested architecture."""
    root = tmp_path_factory.mktemp("families")
    out = {}
    for family in [*FAMILIES, "gpt2"]:
        base = make_model(root / f"{family}-base", family)
        out[family] = (base, make_finetune(base, root / f"{family}-ft", seed=3))
    return out


@pytest.fixture(scope="session")
def model_factory():
    """``make_model`` for tests that need a model of their own shape."""
    return make_model


@pytest.fixture
def fixed_baseline(monkeypatch) -> int:
    """Pin the process's measured baseline memory to a constant, so that a --memory-limit of
    ``fixed_baseline + N`` means N bytes of tensor data in flight; returns the constant."""
    from mergesmith.pipeline.execute import BASELINE_RSS

    monkeypatch.setattr("mergesmith.pipeline.run.baseline_rss", lambda backend=None: BASELINE_RSS)
    return BASELINE_RSS
