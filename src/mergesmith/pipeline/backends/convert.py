"""Float conversions between storage dtypes and float32 for the native backend. bfloat16 is held as uint16:
widening is a shift; narrowing rounds to nearest even, as torch does (compiled loops in loops.py)."""

from __future__ import annotations

import math

import numpy as np

from mergesmith.core.loops import narrow_bf16, widen


def to_float32(x: np.ndarray, code: str) -> np.ndarray:
    """A float32 array of the values of ``x`` (stored as ``code``); ``x`` itself when it is float32."""
    if code == "F32":
        return x
    if code == "BF16":
        out = np.empty(x.shape, dtype=np.float32)
        widen(x.reshape(-1), out.reshape(-1))
        return out
    if code == "F16":
        return x.astype(np.float32)
    raise ValueError(f"no native conversion from {code}")


def _narrow(x: np.ndarray, code: str) -> tuple[np.ndarray, int | None]:
    """float32 ``x`` rounded to ``code`` (stored as numpy holds it), and for bfloat16 the count of
    non-finite results (None: not counted)."""
    if code == "BF16":
        out = np.empty(x.shape, dtype=np.uint16)
        bad = narrow_bf16(np.ascontiguousarray(x).reshape(-1).view(np.uint32), out.reshape(-1))
        return out, bad
    if code == "F16":
        return x.astype(np.float16), None
    if code == "F32":
        return x, None
    raise ValueError(f"no native conversion to {code}")


def from_float32(x: np.ndarray, code: str) -> tuple[np.ndarray, bool]:
    """``x`` rounded to ``code`` (stored as numpy holds it), and whether every result is finite."""
    out, bad = _narrow(x, code)
    if bad is not None:
        return out, bad == 0
    # a sum is NaN or Inf if any element is; only then (or on overflow of the sum) look closer
    finite = math.isfinite(float(out.sum(dtype=np.float32))) or bool(np.isfinite(out).all())
    return out, finite


def round_to(x: np.ndarray, code: str) -> np.ndarray:
    """float32 ``x`` rounded to ``code`` and back to float32 (the config's ``dtype`` for inputs)."""
    return to_float32(_narrow(x, code)[0], code)
