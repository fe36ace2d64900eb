"""Compiled loops for the element-wise methods, reading inputs as stored (bfloat16 as uint16, or float32).

Used by both backends on CPU data: each loop reads every input once and converts it as it goes, instead
of converting whole tensors first and making one pass per operation. Every element goes through the
same float32 operations, in the same order, as the step-by-step kernels, so the results are the same to
the bit. ``fma`` is a fused multiply-add (one rounding), as torch's ``add(alpha=)`` and ``addcmul`` on
the CPU compute it; every other product and sum is rounded on its own.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic, overload


@intrinsic
def fma(typingctx, a, b, c):  # pragma: no cover - compiled
    """a * b + c in float32 with one rounding (LLVM's llvm.fma)."""
    sig = types.float32(types.float32, types.float32, types.float32)

    def codegen(context, builder, signature, args):
        f32 = ir.FloatType()
        fn = builder.module.declare_intrinsic("llvm.fma", [f32], ir.FunctionType(f32, [f32, f32, f32]))
        return builder.call(fn, args)

    return sig, codegen


def load(x, j):  # pragma: no cover - replaced in compiled code by the overload below
    raise NotImplementedError


@overload(load, inline="always")
def _load(x, j):  # pragma: no cover - compiled
    """Element j of a stored array as float32: bfloat16 bits (uint16) are widened, float32 read."""
    if isinstance(x, types.Array) and x.dtype == types.uint16:
        return lambda x, j: np.uint32(np.uint32(x[j]) << np.uint32(16)).view(np.float32)
    if isinstance(x, types.Array) and x.dtype == types.float32:
        return lambda x, j: x[j]
    return None


@njit(cache=True, nogil=True, boundscheck=False)
def widen(x, out):  # pragma: no cover - compiled
    """out = x as float32."""
    for j in range(out.shape[0]):
        out[j] = load(x, j)


@njit(cache=True, nogil=True, boundscheck=False)
def difference(x, base, out):  # pragma: no cover - compiled
    """out = x - base (x as stored, base float32)."""
    for j in range(out.shape[0]):
        out[j] = np.float32(load(x, j) - base[j])


@njit(cache=True, nogil=True, boundscheck=False)
def _scaled(x, w, out):  # pragma: no cover - compiled
    for j in range(out.shape[0]):
        out[j] = np.float32(load(x, j) * w)


@njit(cache=True, nogil=True, boundscheck=False)
def fma_into(x, w, out):  # pragma: no cover - compiled
    """out = fma(x, w, out): out + x * w with one rounding."""
    for j in range(out.shape[0]):
        out[j] = fma(load(x, j), w, out[j])


@njit(cache=True, nogil=True, boundscheck=False)
def _scaled_difference(x, base, w, out):  # pragma: no cover - compiled
    for j in range(out.shape[0]):
        out[j] = np.float32(np.float32(load(x, j) - load(base, j)) * w)


@njit(cache=True, nogil=True, boundscheck=False)
def _add_scaled_difference(x, base, w, out):  # pragma: no cover - compiled
    for j in range(out.shape[0]):
        out[j] = np.float32(out[j] + np.float32(np.float32(load(x, j) - load(base, j)) * w))


@njit(cache=True, nogil=True, boundscheck=False)
def _divide(out, total):  # pragma: no cover - compiled
    for j in range(out.shape[0]):
        out[j] = np.float32(out[j] / total)


@njit(cache=True, nogil=True, boundscheck=False)
def _scale_add(out, lam, base):  # pragma: no cover - compiled
    """out = out * lam + base, rounded after each step."""
    for j in range(out.shape[0]):
        out[j] = np.float32(np.float32(out[j] * lam) + load(base, j))


@njit(cache=True, nogil=True, boundscheck=False)
def interpolate(a, b, c0, c1, out):  # pragma: no cover - compiled
    """out = fma(b, c1, round(a * c0))."""
    for j in range(out.shape[0]):
        out[j] = fma(load(b, j), c1, np.float32(load(a, j) * c0))


@njit(nogil=True, boundscheck=False)
def _row_products(x, y):  # pragma: no cover - compiled
    """(<x, y>, |x|^2, |y|^2) of two float32 rows in float64, in four interleaved partial sums each."""
    d0 = d1 = d2 = d3 = 0.0
    p0 = p1 = p2 = p3 = 0.0
    q0 = q1 = q2 = q3 = 0.0
    n = x.shape[0]
    j = 0
    while j + 4 <= n:
        a0, a1, a2, a3 = np.float64(x[j]), np.float64(x[j + 1]), np.float64(x[j + 2]), np.float64(x[j + 3])
        b0, b1, b2, b3 = np.float64(y[j]), np.float64(y[j + 1]), np.float64(y[j + 2]), np.float64(y[j + 3])
        d0 += a0 * b0
        d1 += a1 * b1
        d2 += a2 * b2
        d3 += a3 * b3
        p0 += a0 * a0
        p1 += a1 * a1
        p2 += a2 * a2
        p3 += a3 * a3
        q0 += b0 * b0
        q1 += b1 * b1
        q2 += b2 * b2
        q3 += b3 * b3
        j += 4
    dt = pt = qt = 0.0
    while j < n:
        a, b = np.float64(x[j]), np.float64(y[j])
        dt += a * b
        pt += a * a
        qt += b * b
        j += 1
    return (d0 + d1) + (d2 + d3) + dt, (p0 + p1) + (p2 + p3) + pt, (q0 + q1) + (q2 + q3) + qt


@njit(cache=True, nogil=True, boundscheck=False)
def row_products(a, b, row_len, out):  # pragma: no cover - compiled
    """out[r] = (<a_r, b_r>, |a_r|^2, |b_r|^2) for the rows of the flat stored arrays a and b (each row
    is widened to float32 in a small buffer first, which lets the sums vectorise better)."""
    x = np.empty(row_len, dtype=np.float32)
    y = np.empty(row_len, dtype=np.float32)
    for r in range(out.shape[0]):
        s = r * row_len
        for j in range(row_len):
            x[j] = load(a, s + j)
        for j in range(row_len):
            y[j] = load(b, s + j)
        d, p, q = _row_products(x, y)
        out[r, 0] = d
        out[r, 1] = p
        out[r, 2] = q


def linear(models: list[np.ndarray], weights, normalize: bool, total: float) -> np.ndarray:
    """LinearKernel's sum on flat stored arrays: round(m0 * w0), then fma(m_i, w_i, .) ..., / total."""
    out = np.empty(models[0].shape[0], dtype=np.float32)
    _scaled(models[0], np.float32(weights[0]), out)
    for m, w in zip(models[1:], weights[1:]):
        fma_into(m, np.float32(w), out)
    if normalize:
        _divide(out, np.float32(total))
    return out


def task_arithmetic(
    base: np.ndarray, models: list[np.ndarray], weights, divide_by: float | None, lam: float
) -> np.ndarray:
    """TaskArithmeticKernel's sum without sparsification on flat stored arrays:
    sum_i round((m_i - base) * w_i), / divide_by (if given), * lambda, + base."""
    out = np.empty(base.shape[0], dtype=np.float32)
    _scaled_difference(models[0], base, np.float32(weights[0]), out)
    for m, w in zip(models[1:], weights[1:]):
        _add_scaled_difference(m, base, np.float32(w), out)
    if divide_by is not None:
        _divide(out, np.float32(divide_by))
    _scale_add(out, np.float32(lam), base)
    return out
