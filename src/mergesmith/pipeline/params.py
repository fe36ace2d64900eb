"""Resolution of one parameter for one tensor: scalars, gradients over layer position, and filters.

Precedence, highest first: the source model's ``parameters``, the slice's, the top-level ones, then the
method's default. A filter list that matches nothing falls through to the next level.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from mergesmith.core.errors import ConfigError, MergeError
from mergesmith.methods import REQUIRED, ParamSpec, check_domain
from mergesmith.pipeline.config import FilterEntry, Parameters

_MISSING = object()


def layer_position(index: int, count: int) -> float:
    """Position of layer ``index`` inside a slice of ``count`` layers, in [0, 1]; the one layer of a
    one-layer slice sits at 1, as in mergekit (a gradient gives it its last value)."""
    return index / (count - 1) if count > 1 else 1.0


def interpolate_gradient(values: Sequence[float], position: float) -> float:
    """Piecewise-linear interpolation of ``values`` spread evenly over [0, 1]."""
    if len(values) == 1:
        return float(values[0])
    s = position * (len(values) - 1)
    i = min(int(math.floor(s)), len(values) - 2)
    frac = s - i
    return float(values[i]) * (1.0 - frac) + float(values[i + 1]) * frac


def _evaluate(value: Any, tensor_name: str, position: float) -> Any:
    if isinstance(value, list):
        if value and isinstance(value[0], FilterEntry):
            for entry in value:
                if entry.filter in (None, "*") or entry.filter in tensor_name:
                    return _evaluate(entry.value, tensor_name, position)
            return _MISSING
        return interpolate_gradient(value, position)
    return value


def lookup(name: str, levels: Sequence[Parameters | None], tensor_name: str, position: float) -> Any:
    """The value of parameter ``name`` at the first level that sets it for this tensor, else _MISSING."""
    for level in levels:
        if level and name in level:
            if isinstance(level[name], list) and not level[name]:
                raise ConfigError(
                    f"parameter {name!r}: an empty list is neither a gradient nor a list of filters; "
                    "give at least one value"
                )
            value = _evaluate(level[name], tensor_name, position)
            if value is not _MISSING:
                return value
    return _MISSING


def _number_from_text(text: str) -> float | str:
    """A number written as a string (`1e-5`, `"0.5"`) as that number; other text unchanged."""
    try:
        return float(text.strip())
    except ValueError:
        return text


def coerce(spec: ParamSpec, value: Any, where: str) -> Any:
    if value is None:
        if spec.default is None:
            return None
        raise ConfigError(f"parameter {spec.name!r} {where}: needs a value, got null")
    if spec.kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, int | float) and value in (0, 1):
            return bool(value)
        raise ConfigError(f"parameter {spec.name!r} {where}: expected true or false, got {value!r}")
    if spec.kind in (float, int):
        if isinstance(value, str):
            value = _number_from_text(value)  # YAML 1.1 reads `1e-5` (no dot) as a string; mergekit takes it
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"parameter {spec.name!r} {where}: expected a number, got {value!r}")
        if not math.isfinite(value):
            raise ConfigError(f"parameter {spec.name!r} {where}: expected a finite number, got {value!r}")
        return spec.kind(value)
    return value


def resolve(
    spec: ParamSpec,
    levels: Sequence[Parameters | None],
    tensor_name: str,
    position: float,
    where: str,
    hint: str = "",
) -> Any:
    """The value of ``spec`` for one tensor (``where`` says which model and tensor, for messages): the
    first level that sets it, else the default; a missing required one, a wrong type or a value outside
    the parameter's domain is a ConfigError. ``hint`` is added to the missing-parameter message."""
    value = lookup(spec.name, levels, tensor_name, position)
    if value is _MISSING:
        if spec.default is REQUIRED:
            raise ConfigError(f"merge needs parameter {spec.name!r} {where}{hint}")
        return spec.default
    value = coerce(spec, value, where)
    try:
        check_domain(spec, value, where)
    except MergeError as exc:
        raise ConfigError(str(exc)) from None
    return value
