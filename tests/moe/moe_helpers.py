"""Loading and running MoE outputs, and expert configs, for the MoE tests (their tiny dense models and
experts come from tiny_models.py: make_dense, make_expert)."""

from __future__ import annotations

from pathlib import Path

import torch

IDS = torch.tensor([[1, 8, 9, 10, 11, 4, 5], [1, 20, 21, 22, 30, 31, 32]])


def load(path: Path):
    """A model folder in transformers, fp32, eval mode; fails on any missing or unexpected tensor."""
    import transformers

    model, info = transformers.AutoModelForCausalLM.from_pretrained(
        str(path), dtype=torch.float32, output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert not info.get("mismatched_keys"), info
    return model.eval()


@torch.no_grad()
def logits(path_or_model, ids: torch.Tensor = IDS) -> torch.Tensor:
    model = load(path_or_model) if isinstance(path_or_model, Path) else path_or_model
    return model(input_ids=ids).logits


def expert_config(base: Path, experts: list[Path], mode: str = "hidden", **extra) -> dict:
    """A config whose expert i is prompted with text made of its own letters."""
    letters = ["abcdef", "ghijkl", "mnopqr", "stuvwx", "yz0123"]
    return {
        "base_model": str(base),
        "gate_mode": mode,
        "dtype": "float32",
        "experts": [
            {"source_model": str(p), "positive_prompts": [letters[i], letters[i][::-1], letters[i][1:4] * 2]}
            for i, p in enumerate(experts)
        ],
        **extra,
    }
