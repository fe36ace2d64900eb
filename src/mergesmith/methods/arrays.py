"""In-place array steps shared by the torch and native backends.

Kernels of methods that the native backend runs (``Method.native``) do their element-wise work through
these helpers, which take torch tensors or float32 numpy arrays. Each step is one IEEE operation per
element in the same order on either backend, so both give the same bits: ``axpy`` is a fused
multiply-add (one rounding) on both, as torch's ``add_(alpha=)`` is; numpy has none, so numpy arrays go
through a compiled loop (mergesmith.core.loops).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from mergesmith.core import loops
from mergesmith.core._torch import torch

Array = Any  # a torch.Tensor or a numpy float32 array


def is_numpy(x: Array) -> bool:
    return isinstance(x, np.ndarray)


def writable(x: Array) -> bool:
    """Whether ``x`` may be changed in place: a numpy input can be a read-only view of input bytes that
    other reads share (core/diskread.FileReader's held ranges)."""
    return not is_numpy(x) or bool(x.flags.writeable)


def like(out: np.ndarray, ref: Array) -> Array:
    """A numpy result shaped as ``ref``: a numpy array, or a CPU tensor sharing its memory when ``ref``
    is a tensor."""
    out = out.reshape(ref.shape)
    return out if is_numpy(ref) else torch.from_numpy(out)


def rows(x: Array) -> tuple[int, int]:
    """(number of rows, elements per row) of ``x`` seen as rows; a 0-D or 1-D array is one row."""
    n = x.shape[0] if x.ndim >= 2 else 1
    size = x.size if is_numpy(x) else x.numel()
    return n, size // max(1, n)


def host_numpy(x: Array) -> np.ndarray | None:
    """A numpy view of ``x`` when it is a numpy array or a contiguous CPU tensor, else None."""
    if isinstance(x, np.ndarray):
        return x
    if x.device.type == "cpu" and x.is_contiguous():
        return x.numpy()
    return None


def host_stored(x: Array) -> np.ndarray | None:
    """A flat numpy view of CPU data as the compiled loops read it (mergesmith.core.loops): bfloat16 as its
    uint16 bits, float32 as is; None for other dtypes and for data on a device. In the native backend a
    uint16 array *is* bfloat16 (merged tensors are floats)."""
    if isinstance(x, np.ndarray):
        return x.reshape(-1) if x.dtype in (np.uint16, np.float32) and x.flags.c_contiguous else None
    if x.device.type != "cpu" or not x.is_contiguous():
        return None
    if x.dtype == torch.bfloat16:
        return x.view(torch.int16).numpy().view(np.uint16).reshape(-1)
    if x.dtype == torch.float32:
        return x.numpy().reshape(-1)
    return None


def as_compute(x: Array, dtype: Any) -> Array:
    """``x`` in the compute dtype: a stored numpy array (bfloat16 bits, float16) becomes float32 (a new
    array); a torch tensor goes through ``.to(dtype)``."""
    if isinstance(x, np.ndarray):
        if x.dtype == np.uint16:
            out = np.empty(x.shape, dtype=np.float32)
            loops.widen(x.reshape(-1), out.reshape(-1))
            return out
        return x if x.dtype == np.float32 else x.astype(np.float32)
    return x.to(dtype)


def mul(x: Array, s: float) -> Array:
    """x *= s (s rounded to x's dtype first, as torch does with a Python number)."""
    if is_numpy(x):
        return np.multiply(x, x.dtype.type(s), out=x)
    return x.mul_(s)


def div(x: Array, s: float) -> Array:
    if is_numpy(x):
        return np.divide(x, x.dtype.type(s), out=x)
    return x.div_(s)


def add(x: Array, y: Array) -> Array:
    """x += y."""
    if is_numpy(x):
        return np.add(x, y, out=x)
    return x.add_(y)


def sub(x: Array, y: Array) -> Array:
    """x -= y."""
    if is_numpy(x):
        return np.subtract(x, y, out=x)
    return x.sub_(y)


def axpy(x: Array, a: float, y: Array) -> Array:
    """x += a * y with one rounding (a fused multiply-add), in place."""
    if is_numpy(x):
        loops.fma_into(np.ascontiguousarray(y, dtype=np.float32).reshape(-1), np.float32(a), x.reshape(-1))
        return x
    return x.add_(y, alpha=a)


def zeros_like(x: Array) -> Array:
    return np.zeros_like(x) if is_numpy(x) else torch.zeros_like(x)


def mask_in_place(x: Array, keep: Any) -> Array:
    """x * keep for a boolean ``keep`` (numpy or torch), in place. On the CPU through numpy: torch's
    float-by-bool multiply runs 2-5x slower than numpy's here."""
    xn = host_numpy(x)
    kn = keep if isinstance(keep, np.ndarray) else host_numpy(keep)
    if xn is not None and kn is not None:
        np.multiply(xn, kn.reshape(xn.shape), out=xn)
        return x
    if isinstance(keep, np.ndarray):
        keep = torch.from_numpy(keep)
    return x.mul_(keep.reshape(x.shape).to(x.device))
