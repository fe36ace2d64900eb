"""Reference string -> model source: the one place that decides what kind of source a reference names.

``path``, ``org/name`` and ``org/name@revision`` are checkpoints on disk: plain safetensors
(:class:`ModelSource`), or a packed BitNet checkpoint (``quant_method: bitnet``, offline), which reads as
float weights (:class:`BitnetModelSource`). ``model+adapter`` is such a checkpoint with a PEFT LoRA adapter
applied as it is read (:class:`LoraModelSource`). The planner and executor only see the common interface.
"""

from __future__ import annotations

from mergesmith.core.model import ModelSource, resolve_model_dir


def open_source(ref: str) -> ModelSource:
    """Open the model that ``ref`` names, reading headers only; fails now, naming the model."""
    if "+" in ref:  # only then can it be a LoRA reference (the LoRA code imports torch)
        from mergesmith.core.lora.source import LoraModelSource, split_lora_ref

        if split_lora_ref(ref)[1] is not None:
            return LoraModelSource.open(ref, open_model=open_checkpoint)
    return open_checkpoint(ref)


def open_checkpoint(ref: str) -> ModelSource:
    """A checkpoint folder (or hub reference), plain or packed BitNet."""
    src = ModelSource(ref, resolve_model_dir(ref))
    if is_packed_bitnet(src.config):
        from mergesmith.core.bitnet.source import BitnetModelSource

        src = BitnetModelSource(ref, src.path)
    return src.checked()


def is_packed_bitnet(config: dict) -> bool:
    """Whether a config.json describes packed ternary weights (transformers' offline BitNet checkpoints)."""
    qc = config.get("quantization_config")
    return (
        isinstance(qc, dict)
        and qc.get("quant_method") == "bitnet"
        and qc.get("quantization_mode", "offline") == "offline"
    )
