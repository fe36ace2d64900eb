"""Tokenizer transplant: MODEL's weights with DONOR's tokenizer.

It is a one-model passthrough merge whose output tokenizer is the donor's (``tokenizer: {source: DONOR}``),
so it streams like a merge and writes through the same output folder: MODEL's embedding and lm_head rows
are read in the donor's token order, and a token MODEL lacks gets, by default, the donor's row of it
written as a combination of the donor's rows of ``k`` tokens both share (orthogonal matching pursuit),
applied to MODEL's rows of those tokens (core/vocab.py, core/omp.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mergesmith.core.errors import MergeError
from mergesmith.core.model import resolve_model_dir
from mergesmith.core.omp import DEFAULT_K
from mergesmith.pipeline.api import merge

INITS = ("omp", "mean", "zero", "subword")


def transplant_tokenizer(
    model: str | Path,
    donor: str | Path,
    out_dir: str | Path,
    *,
    init: str = "omp",
    k: int = DEFAULT_K,
    **options: Any,
) -> Path:
    """Write ``model`` with ``donor``'s tokenizer to ``out_dir``; returns its path. ``init``: how a row for
    a token ``model`` lacks is made: ``omp`` (the donor's row as a combination of ``k`` shared tokens'
    rows, the same combination of the model's rows), ``mean`` (the model's mean row), ``zero``, or
    ``subword`` (the mean of the model's rows of the pieces its own tokenizer splits the token's text
    into). ``options``: those of :func:`mergesmith.merge` (``quiet``, ``overwrite``, ``workers``, ...)."""
    if init not in INITS:
        raise MergeError(f"tokensurgeon: init {init!r} is not one of {', '.join(INITS)}")
    if k < 1:
        raise MergeError(f"tokensurgeon: k must be at least 1, got {k}")
    if Path(model).resolve() == Path(donor).resolve():
        raise MergeError("tokensurgeon: MODEL and DONOR are the same folder; nothing to transplant")
    for role, ref in (("MODEL", model), ("DONOR", donor)):
        # without it the merge would copy the tokenizer files as they are and re-index nothing
        if not (resolve_model_dir(str(ref)) / "tokenizer.json").is_file():
            raise MergeError(
                f"tokensurgeon: {role} {str(ref)!r} has no tokenizer.json, which the transplant reads; save "
                "its tokenizer as a fast tokenizer (AutoTokenizer.from_pretrained(...).save_pretrained(folder))"
            )
    config = {
        "merge_method": "passthrough",
        "models": [{"model": str(model)}],
        "tokenizer": {"source": str(donor), "default_init": init, "omp_k": k},
    }
    options.setdefault("write_model_card", False)
    return merge(config, out_dir, **options)
