"""Tiny models built at test time with transformers config classes; nothing is downloaded."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {"tie_word_embeddings": True}),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", {"head_dim": 8}),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {"pad_token_id": 0}),
}


def _tiny_config(family: str, layers: int, vocab: int):
    import transformers

    if family == "gpt2":
        return transformers.GPT2Config(n_embd=32, n_layer=layers, n_head=4, vocab_size=vocab, n_positions=64)
    cfg_name, _, extra = FAMILIES[family]
    cls = getattr(transformers, cfg_name)
    return cls(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=vocab,
        max_position_embeddings=64,
        **extra,
    )


def make_model(folder: Path, family: str = "llama", layers: int = 3, vocab: int = 96, seed: int = 0) -> Path:
    """Save a tiny randomly initialised model of ``family`` to ``folder``."""
    import transformers

    torch.manual_seed(seed)
    cfg = _tiny_config(family, layers, vocab)
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    model.save_pretrained(folder, safe_serialization=True)
    (folder / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 64}))
    return folder


def make_finetune(base: Path, folder: Path, scale: float = 0.01, seed: int = 1) -> Path:
    """A 'fine-tune' of ``base``: its weights plus small Gaussian noise."""
    import shutil

    shutil.copytree(base, folder)
    g = torch.Generator().manual_seed(seed)
    for f in folder.glob("*.safetensors"):
        tensors = load_file(f)
        out = {}
        for k, v in tensors.items():
            noise = torch.randn(v.shape, generator=g) * scale * (v.float().std() if v.numel() > 1 else 1.0)
            out[k] = (v.float() + noise).to(v.dtype) if v.is_floating_point() else v
        save_file(out, f, metadata={"format": "pt"})
    return folder


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
