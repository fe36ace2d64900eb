"""Tiny PEFT adapters built at test time, and PEFT's own merge of them as the reference."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

peft = pytest.importorskip("peft")


def make_adapter(model_dir: Path, out: Path, seed: int = 0, dtype: torch.dtype | None = None, **lora) -> Path:
    """Save a PEFT LoRA adapter for ``model_dir`` with random (non-zero) A and B."""
    import transformers

    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    cfg = peft.LoraConfig(init_lora_weights=False, **lora)
    peft.get_peft_model(model, cfg).save_pretrained(out)
    return out


def peft_merged(model_dir: Path, adapter: Path, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """PEFT's merge_and_unload of ``adapter`` into ``model_dir``: the state dict we must reproduce."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    merged = peft.PeftModel.from_pretrained(model, adapter).merge_and_unload()
    return {k: v.detach().clone() for k, v in merged.state_dict().items()}


def save_merged(model_dir: Path, adapter: Path, out: Path) -> Path:
    """A merged copy on disk, as mergekit's --lora-merge-cache would make it."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir)
    peft.PeftModel.from_pretrained(model, adapter).merge_and_unload().save_pretrained(out)
    return out
