"""Fixtures for the LoRA tests: adapters built with PEFT on the tiny models of tests/conftest.py."""

from __future__ import annotations

from pathlib import Path

import pytest
from _lora_helpers import make_adapter

pytest.importorskip("peft")


@pytest.fixture(scope="session")
def llama_lora(llama_trio, tmp_path_factory) -> Path:
    """An adapter on the tiny Llama base touching attention, MLP, embeddings and lm_head, with per-module
    rank and alpha patterns."""
    base = llama_trio[0]
    return make_adapter(
        base,
        tmp_path_factory.mktemp("lora") / "llama-lora",
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj", "down_proj", "embed_tokens", "lm_head"],
        rank_pattern={"model.layers.1.self_attn.q_proj": 2},
        alpha_pattern={"v_proj": 3},
    )
