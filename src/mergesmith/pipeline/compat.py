"""mergesmith's extensions of mergekit's methods (a parameter that mergekit's method does not take, such as
model_stock's ``weight``): a config that uses one merges differently under mergekit, so its effect is never
silent. Such a parameter's spec says what mergekit does instead (``ParamSpec.extension``); this module
finds where it changes a plan's result, warns once per parameter, and under ``mergekit_compat`` gives every
tensor the parameter's default, which is mergekit's result.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mergesmith.methods import Method, ParamSpec
    from mergesmith.pipeline.plan import OutputTensor

log = logging.getLogger("mergesmith")


def _in_effect(spec: ParamSpec, value: Any) -> bool:
    """Whether a resolved value gives another result than mergekit's: per-model weights that differ
    between the models (equal ones cancel in every method that has them as an extension), a per-tensor
    value other than the default."""
    if spec.per_model:
        return len(set(value)) > 1
    return value != spec.default


def apply_extensions(
    tensors: list[OutputTensor], method: Method, mergekit_compat: bool, warn: Callable[[str], None]
) -> list[OutputTensor]:
    """``tensors`` as planned, or with every extension parameter reset to its default under
    ``mergekit_compat``; one warning (or, under ``mergekit_compat``, an info line) per parameter in effect."""
    specs = [s for s in method.params if s.extension]
    if not specs:
        return tensors
    first: dict[str, tuple[str, Any]] = {}
    for t in tensors:
        if t.method != method.name:
            continue  # a tensor copied unmerged (--allow-crimes)
        params = dict(t.params)
        for spec in specs:
            if spec.name not in first and _in_effect(spec, params[spec.name]):
                first[spec.name] = (t.name, params[spec.name])
    for name, (tensor, value) in first.items():
        spec = method.param_index[name]
        shown = (
            ", ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value)
            if spec.per_model
            else value
        )
        if mergekit_compat:
            log.info("parameter %r ignored, as mergekit does (--mergekit-compat)", name)
            continue
        warn(
            f"parameter {name!r} changes this merge's result from mergekit's ({shown} for tensor {tensor}): "
            f"{spec.extension}. Pass --mergekit-compat (mergekit_compat=True) for mergekit's result"
        )
    if not mergekit_compat:
        return tensors
    # every tensor, also where equal weights cancel only up to rounding
    return [_reset(t, specs) if t.method == method.name else t for t in tensors]


def _reset(t: OutputTensor, specs: list[ParamSpec]) -> OutputTensor:
    params = dict(t.params)
    for spec in specs:
        params[spec.name] = (spec.default,) * len(params[spec.name]) if spec.per_model else spec.default
    return dataclasses.replace(t, params=tuple(params.items()))
