"""Loading models and tokenizers through transformers, under one policy for folders we do not trust.

``eval``, ``moe`` (the prompt pass) and ``bitnet --heal`` run models through transformers; ``merge`` and
the rest read safetensors themselves. Every transformers load goes through here, so that all of them:

* never run a repository's Python code: ``trust_remote_code=False`` is always passed (without it
  transformers asks on stdin, and answering ``y`` runs the files an ``auto_map`` names);
* never unpickle: ``use_safetensors=True``, and a folder with only ``.bin``/``.pt`` weights is refused with
  the same one line as in every other command (:func:`mergesmith.core.model.pickle_hint`);
* only read files inside the model folder: every entry of the folder is checked with
  :func:`mergesmith.core.model.model_file` first (transformers opens files we do not know the names of), and
  the weights' headers with the strict safetensors parser;
* fail with one line: whatever a malformed config.json, tokenizer.json or weight file makes transformers
  or tokenizers raise becomes a :class:`MergeError` naming the model.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mergesmith.core.errors import MergeError
from mergesmith.core.model import ModelSource, model_file, read_json_file

#: Passed to every ``from_pretrained`` of the project.
NO_REMOTE_CODE: dict[str, Any] = {"trust_remote_code": False}


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """No loading bars or warnings from transformers while a model or tokenizer loads."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def check_folder(folder: Path, ref: str) -> None:
    """Refuse a folder in which any entry leads outside it (transformers may open any of them)."""
    try:
        names = sorted(os.listdir(folder))
    except OSError as exc:
        raise MergeError(f"model {ref!r}: cannot list {folder} ({exc.strerror})") from None
    for name in names:
        model_file(folder, name, ref)


def checked_source(source: ModelSource) -> ModelSource:
    """``source`` after the checks a transformers load needs: every folder entry inside the folder,
    config.json a JSON object, safetensors weights present (no pickles) with valid headers."""
    from mergesmith.core.arch import Layout

    check_folder(source.path, source.ref)
    # the layer count config.json gives must match the checkpoint's (as a merge checks): transformers
    # would drop the extra layers or build missing ones at random, and score that model silently
    Layout.infer(source.ref, list(source.tensors), source.config)
    return source


def _is_bitnet(source: ModelSource) -> bool:
    """Whether config.json on disk has a BitNet quantization_config (a BitnetModelSource hides it)."""
    raw = read_json_file(source.file("config.json"), f"model {source.ref!r}: config.json")
    qc = raw.get("quantization_config") if isinstance(raw, dict) else None
    return isinstance(qc, dict) and qc.get("quant_method") == "bitnet"


def load_causal_lm(source: ModelSource, dtype: Any, purpose: str) -> Any:
    """``AutoModelForCausalLM`` of a checked model folder in ``dtype`` ("auto": the checkpoint's); for a
    ``MODEL+ADAPTER`` source, MODEL with the adapter's patched weights put in place.

    A packed BitNet checkpoint computes in the dtype it was saved in (its BitLinear layers unpack their
    weights to it), so it is always loaded with dtype "auto"; callers that want float32 logits cast them.
    ``purpose`` ends the error message ("for the prompt pass").
    """
    from mergesmith.core.lora.source import LoraModelSource

    if isinstance(source, LoraModelSource):
        model = load_causal_lm(source.base, dtype, purpose)
        _apply_adapter(model, source)
        return model
    checked_source(source)
    if _is_bitnet(source):
        dtype = "auto"
    return _from_pretrained(source, dtype, purpose)


def _apply_adapter(model: Any, source: Any) -> None:
    """Replace every weight a LoRA adapter changes by the patched one (exactly what ``merge`` writes)."""
    import torch

    params = dict(model.named_parameters())
    with torch.no_grad():
        for name in source.patches:
            param = params.get(name)
            shape = tuple(source.tensors[name].shape)
            if param is None or tuple(param.shape) != shape:
                raise MergeError(
                    f"model {source.ref!r}: the adapter changes {name!r}, which the loaded model has no "
                    f"parameter of shape {list(shape)} for; merge the adapter with `mergesmith merge` first"
                )
            param.copy_(source.read(name).to(param.dtype))


def _from_pretrained(source: ModelSource, dtype: Any, purpose: str) -> Any:
    from transformers import AutoModelForCausalLM

    try:
        with quiet_transformers():
            return AutoModelForCausalLM.from_pretrained(
                str(source.path), dtype=dtype, use_safetensors=True, **NO_REMOTE_CODE
            )
    except ImportError as exc:
        raise MergeError(
            f"model {source.ref!r}: transformers needs a package to load it: {first_line(exc)}"
        ) from None
    except Exception as exc:  # anything a malformed checkpoint makes transformers raise: one line
        raise MergeError(
            f"model {source.ref!r}: transformers cannot load it {purpose} ({type(exc).__name__}: "
            f"{first_line(exc)})"
        ) from None


def load_tokenizer(folder: Path, ref: str, hint: str = "") -> Any:
    """``AutoTokenizer`` of a model folder, every entry of which is checked to lie inside it first;
    ``hint`` is appended to the error message."""
    from transformers import AutoTokenizer

    check_folder(folder, ref)
    try:
        with quiet_transformers():
            return AutoTokenizer.from_pretrained(str(folder), **NO_REMOTE_CODE)
    except RecursionError:
        raise MergeError(f"model {ref!r}: its tokenizer files are nested too deeply to parse{hint}") from None
    except Exception as exc:  # tokenizers raises plain Exception on a malformed tokenizer.json
        raise MergeError(
            f"model {ref!r}: cannot load its tokenizer ({type(exc).__name__}: {first_line(exc)}){hint}"
        ) from None


def drop_remote_code(out_config: dict, ref: str) -> str | None:
    """Remove ``auto_map`` (classes that transformers would import from Python files in the folder, i.e.
    remote code) from an output config derived from model ``ref``'s; returns the warning to show, or None.
    The output is loaded with the architecture's built-in transformers classes instead."""
    auto_map = out_config.pop("auto_map", None)
    if auto_map is None:
        return None
    names = ", ".join(sorted(auto_map)) if isinstance(auto_map, dict) else repr(auto_map)
    return (
        f"config.json of {ref!r} has auto_map ({names}), which points transformers at Python files; it is "
        "not copied into the output, which loads with transformers' built-in classes"
    )
