"""Which kind of layer owns each weight: nn.Linear, GPT-2's Conv1D or nn.Embedding.

A safetensors checkpoint does not say how a 2-D weight is used, but LoRA factors depend on it: Conv1D stores
its weight as (in, out), so PEFT applies ``(B @ A).T`` there (``fan_in_fan_out``), and embeddings take
``lora_embedding_A/B`` instead of ``lora_A/B``. We ask transformers by instantiating the architecture on
the ``meta`` device (no memory, no weights, well under a second); when that is not possible (an unknown or
remote-code architecture) callers fall back to shapes and names.
"""

from __future__ import annotations

import json
import logging
import warnings
from functools import lru_cache
from typing import Literal

ModuleKind = Literal["linear", "conv1d", "embedding"]


def module_kinds(config: dict) -> dict[str, ModuleKind] | None:
    """Module name -> kind for every Linear, Conv1D and Embedding of the architecture config.json
    describes; None when transformers cannot build it (then callers use shapes and names)."""
    return _module_kinds(json.dumps(config, sort_keys=True))


@lru_cache(maxsize=8)
def _module_kinds(config_json: str) -> dict[str, ModuleKind] | None:
    try:
        import torch
        import transformers
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers is a dependency
        return None
    config = json.loads(config_json)
    model_type = config.get("model_type")
    if not isinstance(model_type, str):
        return None
    log = logging.getLogger("transformers")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # built-in classes only: auto_map (remote code) is dropped, and never trusted
            fields = {k: v for k, v in config.items() if k not in ("model_type", "auto_map")}
            cfg = transformers.AutoConfig.for_model(model_type, **fields)
            with torch.device("meta"):
                model = transformers.AutoModelForCausalLM.from_config(cfg, trust_remote_code=False)
    except Exception:  # any architecture transformers cannot build here: fall back to heuristics
        return None
    finally:
        log.setLevel(level)
    kinds: dict[str, ModuleKind] = {}
    for name, module in model.named_modules():
        if isinstance(module, Conv1D):
            kinds[name] = "conv1d"
        elif isinstance(module, torch.nn.Embedding):
            kinds[name] = "embedding"
        elif isinstance(module, torch.nn.Linear):
            kinds[name] = "linear"
    return kinds
