"""Load a causal LM and its tokenizer for evaluation, turning every expected failure into a MergeError.

Evaluation runs on the CPU in float32: merged models are judged on what they compute, not on what a
lower precision rounds away.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel
from transformers.utils import logging as hf_logging

from mergesmith.errors import MergeError

ModelLike = str | Path | PreTrainedModel


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Hide transformers' own loading bars and warnings: eval shows one progress bar, its own."""
    was_enabled = hf_logging.is_progress_bar_enabled()
    level = hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if was_enabled:
            hf_logging.enable_progress_bar()


def check_model_folder(path: str | Path) -> Path:
    """Fail early, before any model is loaded, when a folder cannot be a saved model."""
    folder = Path(path)
    if not folder.is_dir():
        raise MergeError(f"model folder {folder} does not exist; pass a folder written by save_pretrained")
    if not (folder / "config.json").is_file():
        raise MergeError(
            f"model folder {folder} has no config.json; pass a folder written by save_pretrained"
        )
    return folder


def load_tokenizer(source: str | Path) -> Any:
    """The tokenizer of ``source``, set up for batched generation: left padding and a pad token."""
    try:
        with _quiet_transformers():
            tokenizer = AutoTokenizer.from_pretrained(str(source))
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise MergeError(
            f"cannot load a tokenizer from {source} ({first}); save one next to the model"
        ) from None
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token_id is None:
            raise MergeError(f"tokenizer in {source} has neither a pad nor an eos token; add a pad token")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(model_or_path: ModelLike, tokenizer: Any = None) -> tuple[PreTrainedModel, Any]:
    """Return ``(model, tokenizer)`` in eval mode; a model object is used as is, a path is loaded."""
    if isinstance(model_or_path, PreTrainedModel):
        model = model_or_path
        if tokenizer is None:
            source = getattr(model, "name_or_path", "") or ""
            if not source:
                raise MergeError("an in-memory model needs tokenizer=...; it has no folder to load one from")
            tokenizer = load_tokenizer(source)
    else:
        folder = check_model_folder(model_or_path)
        try:
            with _quiet_transformers():
                model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
        except (OSError, ValueError, KeyError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise MergeError(f"cannot load a causal LM from {folder} ({first})") from None
        if tokenizer is None:
            tokenizer = load_tokenizer(folder)
    if tokenizer.pad_token_id is None or tokenizer.padding_side != "left":
        tokenizer.padding_side = "left"
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
    model.eval()
    return model, tokenizer
