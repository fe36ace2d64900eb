"""Load a causal LM and its tokenizer for evaluation, turning every expected failure into a MergeError.

Evaluation runs on the CPU in float32: merged models are judged on what they compute, not on what a
lower precision rounds away. Packed BitNet checkpoints run in their own dtype (their layers unpack to
it). Loading follows :mod:`mergesmith.core.hf_load`: no remote code, no pickles, files inside the folder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel

from mergesmith.core import hf_load
from mergesmith.core.errors import MergeError
from mergesmith.core.model import ModelSource, parse_model_ref
from mergesmith.core.sources import open_source

ModelLike = str | Path | PreTrainedModel


def check_model_folder(ref: str | Path) -> ModelSource:
    """Fail early, before any model is loaded, when a reference cannot be scored: opens it as every
    command does (a folder, ``org/name`` from the Hugging Face cache, or ``model+adapter``), with the
    checks of :mod:`mergesmith.core.hf_load` (files inside the folder, safetensors only, valid headers)."""
    from mergesmith.core.lora.source import LoraModelSource, split_lora_ref

    text = str(ref)
    model, _ = split_lora_ref(text) if "+" in text else (text, None)
    folder = Path(parse_model_ref(model)[0]).expanduser()
    looks_local = model.startswith((".", "/", "~")) or model.count("/") != 1
    if not folder.exists() and looks_local:
        raise MergeError(f"model folder {folder} does not exist; pass a folder written by save_pretrained")
    if folder.exists() and not folder.is_dir():
        raise MergeError(f"model {model!r} is a file; pass a folder written by save_pretrained")
    source = open_source(text)
    hf_load.checked_source(source.base if isinstance(source, LoraModelSource) else source)
    return source


def check_model(ref: str | Path) -> None:
    """Everything that can be checked before the first model loads: the reference, its files and
    weights' headers (:func:`check_model_folder`), and its tokenizer (cheap to load)."""
    from mergesmith.core.lora.source import LoraModelSource

    source = check_model_folder(ref)
    source.close()
    load_tokenizer(source.base.path if isinstance(source, LoraModelSource) else source.path)


def load_tokenizer(source: str | Path) -> Any:
    """The tokenizer of ``source``, set up for batched generation: left padding and a pad token."""
    tokenizer = hf_load.load_tokenizer(Path(source), str(source), "; save one next to the model")
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token_id is None:
            raise MergeError(f"tokenizer in {source} has neither a pad nor an eos token; add a pad token")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(model_or_path: ModelLike, tokenizer: Any = None) -> tuple[PreTrainedModel, Any]:
    """Return ``(model, tokenizer)`` in eval mode; a model object is used as is, a reference is loaded.

    Float checkpoints are scored in float32 (merged models are judged on what they compute, not on what
    a lower precision rounds away); a packed BitNet checkpoint in the dtype it computes in.
    """
    from mergesmith.core.lora.source import LoraModelSource

    if isinstance(model_or_path, PreTrainedModel):
        model = model_or_path
        if tokenizer is None:
            source = getattr(model, "name_or_path", "") or ""
            if not source:
                raise MergeError("an in-memory model needs tokenizer=...; it has no folder to load one from")
            tokenizer = load_tokenizer(source)
    else:
        source = check_model_folder(model_or_path)
        base = source.base if isinstance(source, LoraModelSource) else source
        model = hf_load.load_causal_lm(source, torch.float32, "for evaluation")
        source.close()
        if tokenizer is None:
            tokenizer = load_tokenizer(base.path)
    if tokenizer.pad_token_id is None or tokenizer.padding_side != "left":
        tokenizer.padding_side = "left"
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
    model.eval()
    return model, tokenizer
