"""Fixtures of the MoE tests: tiny dense models with a character tokenizer (see tiny_models.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tiny_models import make_dense, make_expert


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models: intra-op threads only add synchronisation on a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def llama_models(tmp_path_factory) -> dict[str, Path]:
    """A tiny Llama base and three experts that differ from it in their MLPs."""
    root = tmp_path_factory.mktemp("moe-llama")
    base = make_dense(root / "base")
    return {"base": base, **{f"e{i}": make_expert(base, root / f"e{i}", seed=10 + i) for i in range(3)}}


@pytest.fixture(scope="session")
def dense_factory():
    return make_dense


@pytest.fixture(scope="session")
def expert_factory():
    return make_expert
