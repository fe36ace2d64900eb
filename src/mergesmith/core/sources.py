"""Reference string -> model source: the one place that decides what kind of source a reference names.

``path``, ``org/name`` and ``org/name@revision`` are checkpoints on disk (:class:`ModelSource`);
``model+adapter`` is a model with a PEFT LoRA adapter applied as it is read (:class:`LoraModelSource`). The
planner and executor only see the common interface.
"""

from __future__ import annotations

from mergesmith.core.model import ModelSource


def open_source(ref: str) -> ModelSource:
    """Open the model that ``ref`` names, reading headers only; fails now, naming the model."""
    if "+" in ref:  # only then can it be a LoRA reference (the LoRA code imports torch)
        from mergesmith.lora.source import LoraModelSource, split_lora_ref

        if split_lora_ref(ref)[1] is not None:
            return LoraModelSource.open(ref)
    return ModelSource.open(ref)
