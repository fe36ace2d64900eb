"""Every numba-compiled loop that another compiled loop calls, in one module.

numba caches compiled functions on disk and recompiles one when its own source file changes, but not when
a function it calls changes in another file: loops that call each other live here so that their caches
are invalidated together. The loops work on CPU data for both backends; they read inputs as stored
(bfloat16 as uint16 bits, or float32) and do each element's float32 operations in the order the
step-by-step kernels do them (``fma`` where torch and mergekit fuse a multiply-add), so results do not
depend on which path ran.
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
    """out = x - base (both as stored)."""
    for j in range(out.shape[0]):
        out[j] = np.float32(load(x, j) - load(base, j))


@njit(cache=True, nogil=True, boundscheck=False)
def fma_into(x, w, out):  # pragma: no cover - compiled
    """out = fma(x, w, out): out + x * w with one rounding."""
    for j in range(out.shape[0]):
        out[j] = fma(load(x, j), w, out[j])


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


# --- bfloat16 rounding ---------------------------------------------------------------------------

BF16_NAN = np.uint16(0xFFFF)  # what torch's vectorised float32 -> bfloat16 conversion gives for NaN


@njit(cache=True, nogil=True, boundscheck=False)
def narrow_bf16(src, dst):  # pragma: no cover - compiled
    """Round float32 bits ``src`` to bfloat16 bits ``dst``; returns how many results are Inf or NaN."""
    bad = 0
    for j in range(src.shape[0]):
        u = src[j]
        r = np.uint16((u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16))
        if (u & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000):
            r = BF16_NAN
        dst[j] = r
        bad += (r & np.uint16(0x7F80)) == np.uint16(0x7F80)
    return bad


# --- row statistics ------------------------------------------------------------------------------


@njit(inline="always")
def abs_sum(x, start, end):  # pragma: no cover - compiled
    """sum |x[start:end]| in float64, in eight interleaved partial sums (a fixed order that vectorises)."""
    a0 = a1 = a2 = a3 = a4 = a5 = a6 = a7 = 0.0
    j = start
    while j + 8 <= end:
        a0 += abs(np.float64(x[j]))
        a1 += abs(np.float64(x[j + 1]))
        a2 += abs(np.float64(x[j + 2]))
        a3 += abs(np.float64(x[j + 3]))
        a4 += abs(np.float64(x[j + 4]))
        a5 += abs(np.float64(x[j + 5]))
        a6 += abs(np.float64(x[j + 6]))
        a7 += abs(np.float64(x[j + 7]))
        j += 8
    tail = 0.0
    while j < end:
        tail += abs(np.float64(x[j]))
        j += 1
    return ((a0 + a1) + (a2 + a3)) + ((a4 + a5) + (a6 + a7)) + tail


@njit(nogil=True, boundscheck=False)
def row_abs_sum(row):  # pragma: no cover - compiled
    """sum |row| in float64 (a compiled function of its own, so that its loop vectorises)."""
    return abs_sum(row, 0, row.shape[0])


@njit(cache=True, nogil=True, boundscheck=False)
def row_abs_sums(x, row_len, out):  # pragma: no cover - compiled
    """out[r] = sum |row r| of the flat rows of ``x``."""
    for r in range(out.shape[0]):
        out[r] = row_abs_sum(x[r * row_len : (r + 1) * row_len])


# --- DARE's random stream (rng.py) ---------------------------------------------------------------


@njit(inline="always")
def _lowbias32(x):  # pragma: no cover - compiled
    # every step is cast back to uint32: numba widens integer arithmetic
    x = np.uint32(x ^ (x >> np.uint32(16)))
    x = np.uint32(x * np.uint32(0x7FEB352D))
    x = np.uint32(x ^ (x >> np.uint32(15)))
    x = np.uint32(x * np.uint32(0x846CA68B))
    return np.uint32(x ^ (x >> np.uint32(16)))


@njit(inline="always")
def _hi_mix(index, k1):  # pragma: no cover - compiled
    """The key for the high half of element ``index`` (uint64)."""
    hi = np.uint32(index >> np.uint64(32))
    return np.uint32(np.uint32(hi * np.uint32(0x9E3779B9)) ^ k1)


@njit(inline="always")
def _draw_lo(lo, k0, hi_mix):  # pragma: no cover - compiled
    """The 32-bit number of the element whose index has low half ``lo`` (uint32), high half mixed."""
    return _lowbias32(np.uint32(_lowbias32(np.uint32(lo ^ k0)) ^ hi_mix))


@njit(inline="always")
def draw(index, k0, k1):  # pragma: no cover - compiled
    """The 32-bit number of element ``index`` (uint64) under the key (k0, k1)."""
    return _draw_lo(np.uint32(index & np.uint64(0xFFFFFFFF)), k0, _hi_mix(index, k1))


@njit(cache=True, nogil=True, boundscheck=False)
def keep_const(start, k0, k1, threshold, out):  # pragma: no cover - compiled
    for i in range(out.shape[0]):
        out[i] = np.uint64(draw(start + np.uint64(i), k0, k1)) < threshold


@njit(cache=True, nogil=True, boundscheck=False)
def keep_each(start, k0, k1, thresholds, out):  # pragma: no cover - compiled
    for i in range(out.shape[0]):
        out[i] = np.uint64(draw(start + np.uint64(i), k0, k1)) < thresholds[i]


@njit(nogil=True, boundscheck=False)
def _mask_run(lo, hi_mix, k0, t, x):  # pragma: no cover - compiled
    """x[i] *= (draw of element lo + i <= t), for indices sharing one high half (mixed: hi_mix)."""
    for i in range(x.shape[0]):
        x[i] *= np.float32(_draw_lo(np.uint32(lo + np.uint32(i)), k0, hi_mix) <= t)


@njit(cache=True, nogil=True, boundscheck=False)
def mask_const(start, k0, k1, threshold, x):  # pragma: no cover - compiled
    """x *= keep (1.0 or 0.0, as a multiply by a boolean mask does), in place: element start + i is kept
    when draw(start + i) < threshold. The high half of the index is mixed once per run of 2**32."""
    if threshold == np.uint64(0):
        for i in range(x.shape[0]):
            x[i] *= np.float32(0.0)
        return
    t = np.uint32(min(threshold, np.uint64(1) << np.uint64(32)) - np.uint64(1))  # h < T  <=>  h <= T - 1
    done = 0
    n = x.shape[0]
    while done < n:
        index = start + np.uint64(done)
        lo = np.uint32(index & np.uint64(0xFFFFFFFF))
        run = min(n - done, np.int64(np.uint64(1) << np.uint64(32)) - np.int64(lo))
        _mask_run(lo, _hi_mix(index, k1), k0, t, x[done : done + run])
        done += run


# --- magnitude histograms and the trim (methods/sparsify.py) ------------------------------------

HI_BINS = 1 << 15  # non-negative float32: sign bit 0, so the top 16 bits fit in 15 bits
LO_BINS = 1 << 16
SCAN_BLOCK = 4096  # elements counted, trimmed or differenced at once


@njit(nogil=True, boundscheck=False)
def _count_hi_into(bits, c):  # pragma: no cover - compiled
    """c[j % 4, top 16 bits of |x_j|] += 1 over float32 bit patterns ``bits`` (uint32): four
    interleaved histograms (neighbouring values often share a bin)."""
    n = bits.shape[0]
    j = 0
    while j + 4 <= n:
        c[0, (bits[j] >> np.uint32(16)) & np.uint32(0x7FFF)] += 1
        c[1, (bits[j + 1] >> np.uint32(16)) & np.uint32(0x7FFF)] += 1
        c[2, (bits[j + 2] >> np.uint32(16)) & np.uint32(0x7FFF)] += 1
        c[3, (bits[j + 3] >> np.uint32(16)) & np.uint32(0x7FFF)] += 1
        j += 4
    while j < n:
        c[0, (bits[j] >> np.uint32(16)) & np.uint32(0x7FFF)] += 1
        j += 1


@njit(nogil=True, boundscheck=False)
def _add_hi(c, counts):  # pragma: no cover - compiled
    for b in range(counts.shape[0]):
        counts[b] += c[0, b] + c[1, b] + c[2, b] + c[3, b]


@njit(cache=True, nogil=True, boundscheck=False)
def count_hi(bits, counts):  # pragma: no cover - compiled
    """counts[top 16 bits of |x|] += 1 over float32 bit patterns ``bits`` (uint32)."""
    c = np.zeros((4, counts.shape[0]), dtype=np.int64)
    _count_hi_into(bits, c)
    _add_hi(c, counts)


@njit(nogil=True, boundscheck=False)
def _task_vector_block(x, base, s, buf):  # pragma: no cover - compiled
    """The float32 bit patterns of x - base (stored inputs) at elements [s, s + SCAN_BLOCK), made in
    ``buf``."""
    m = min(x.shape[0], s + SCAN_BLOCK) - s
    difference(x[s : s + m], base[s : s + m], buf[:m])
    return buf[:m].view(np.uint32)


@njit(cache=True, nogil=True, boundscheck=False)
def count_hi_difference(x, base, counts):  # pragma: no cover - compiled
    """count_hi of the task vector x - base (stored inputs), made block by block and never stored."""
    c = np.zeros((4, counts.shape[0]), dtype=np.int64)
    buf = np.empty(SCAN_BLOCK, dtype=np.float32)
    for s in range(0, x.shape[0], SCAN_BLOCK):
        _count_hi_into(_task_vector_block(x, base, s, buf), c)
    _add_hi(c, counts)


@njit(nogil=True, boundscheck=False)
def _count_window_into(bits, first, rows, window, found):  # pragma: no cover - compiled
    """window[rows[top - first], low 16 bits] += 1 for the |x| among ``bits`` (at most SCAN_BLOCK) whose
    top 16 bits ``top`` lie in [first, first + len(rows)), gathered first as _count_lo_into does (a bin
    of that span that is not counted has the last row of ``window``, a spare)."""
    width = np.uint32(rows.shape[0])
    c = 0
    for j in range(bits.shape[0]):
        u = bits[j] & np.uint32(0x7FFFFFFF)
        found[c] = u
        c += np.int64(np.uint32((u >> np.uint32(16)) - first) < width)
    for t in range(c):
        u = found[t]
        window[np.int64(rows[(u >> np.uint32(16)) - first]), np.int64(u & np.uint32(0xFFFF))] += 1


@njit(cache=True, nogil=True, boundscheck=False)
def count_hi_window_difference(x, base, counts, first, rows, window):  # pragma: no cover - compiled
    """count_hi_difference, and in the same scan the low-bit histograms of the bins [first, first +
    len(rows)) into the rows ``rows`` of ``window``, so that a threshold in one of them needs no second
    pass."""
    c = np.zeros((4, counts.shape[0]), dtype=np.int64)
    found = np.empty(SCAN_BLOCK + 1, dtype=np.uint32)
    buf = np.empty(SCAN_BLOCK, dtype=np.float32)
    for s in range(0, x.shape[0], SCAN_BLOCK):
        bits = _task_vector_block(x, base, s, buf)
        _count_hi_into(bits, c)
        _count_window_into(bits, first, rows, window, found)
    _add_hi(c, counts)


@njit(nogil=True, boundscheck=False)
def _count_lo_into(bits, b, counts, found):  # pragma: no cover - compiled
    """counts[low 16 bits] += 1 for the |x| among ``bits`` (at most SCAN_BLOCK) whose top 16 bits are
    ``b``. The values in that bin are first gathered without a branch (a store at a position that
    advances only on a match), then counted: a branch per element mispredicted, and a catch-all counter
    bumped for every other element made a chain of dependent memory updates (1-2 ns an element either
    way)."""
    c = 0
    for j in range(bits.shape[0]):
        u = bits[j] & np.uint32(0x7FFFFFFF)
        found[c] = u
        c += np.int64((u >> np.uint32(16)) == b)
    for t in range(c):
        counts[np.int64(found[t] & np.uint32(0xFFFF))] += 1


@njit(cache=True, nogil=True, boundscheck=False)
def count_lo(bits, b, counts):  # pragma: no cover - compiled
    """counts[low 16 bits] += 1 for the |x| (float32 bit patterns ``bits``) whose top 16 bits are ``b``."""
    found = np.empty(SCAN_BLOCK + 1, dtype=np.uint32)
    n = bits.shape[0]
    for s in range(0, n, SCAN_BLOCK):
        _count_lo_into(bits[s : min(n, s + SCAN_BLOCK)], b, counts, found)


@njit(cache=True, nogil=True, boundscheck=False)
def count_lo_difference(x, base, b, counts):  # pragma: no cover - compiled
    """count_lo of the task vector x - base (stored inputs), made block by block and never stored."""
    found = np.empty(SCAN_BLOCK + 1, dtype=np.uint32)
    buf = np.empty(SCAN_BLOCK, dtype=np.float32)
    for s in range(0, x.shape[0], SCAN_BLOCK):
        _count_lo_into(_task_vector_block(x, base, s, buf), b, counts, found)


@njit(nogil=True, boundscheck=False)
def _count_ties(xb, tie_bits):  # pragma: no cover - compiled
    """How many of the float32 bit patterns ``xb`` are +-``tie_bits``. (The block loops are compiled
    functions of their own, called on slices: inlined into the trim loop they did not vectorise, and
    the scan took 2 ns an element instead of 0.3.)"""
    hits = 0
    for j in range(xb.shape[0]):
        hits += np.int64((xb[j] & np.uint32(0x7FFFFFFF)) == tie_bits)
    return hits


@njit(nogil=True, boundscheck=False)
def _zero_ties(xb, tie_bits, out):  # pragma: no cover - compiled
    """out[j] = 0 where the bit pattern xb[j] is +-``tie_bits``."""
    zero = out.dtype.type(0)
    for j in range(xb.shape[0]):
        out[j] = zero if (xb[j] & np.uint32(0x7FFFFFFF)) == tie_bits else out[j]


@njit(nogil=True, boundscheck=False)
def _drop_ties(xb, tie_bits, budget, out):  # pragma: no cover - compiled
    """Zero in ``out`` the first ``budget`` (at most) entries whose bit patterns ``xb`` are +-``tie_bits``
    (one block); returns how many it zeroed."""
    hits = _count_ties(xb, tie_bits)
    if hits == 0 or budget <= 0:
        return 0
    if hits <= budget:  # every tie in the block goes
        _zero_ties(xb, tie_bits, out)
        return hits
    seen = 0  # the block where the budget runs out
    zero = out.dtype.type(0)
    for j in range(xb.shape[0]):
        if seen < budget and (xb[j] & np.uint32(0x7FFFFFFF)) == tie_bits:
            out[j] = zero
            seen += 1
    return seen


@njit(nogil=True, boundscheck=False)
def _shrink(x, lam, out):  # pragma: no cover - compiled
    """out = x with 0 where -lam <= x <= lam (torch's hardshrink; NaN stays)."""
    zero = x.dtype.type(0)
    for j in range(x.shape[0]):
        v = x[j]
        out[j] = zero if (v >= -lam and v <= lam) else v


@njit(cache=True, nogil=True, boundscheck=False)
def trim(x, xb, lam, shrink, tie_bits, budget, out):  # pragma: no cover - compiled
    """out = x, with 0 where -lam <= x <= lam when ``shrink``, and with 0 at the first ``budget``
    elements whose |x| as float32 has the bits ``tie_bits`` (``xb``: the float32 bit patterns of x).
    Returns how many of those it zeroed. Ties are counted block by block and zeroed only in blocks that
    hold some."""
    if shrink:
        _shrink(x, lam, out)
    else:
        out[:] = x
    seen = 0
    n = x.shape[0]
    for s in range(0, n, SCAN_BLOCK):
        if seen >= budget:
            break
        e = min(n, s + SCAN_BLOCK)
        seen += _drop_ties(xb[s:e], tie_bits, budget - seen, out[s:e])
    return seen


# --- task vectors (methods/task_arithmetic.py) ---------------------------------------------------


@njit(nogil=True, boundscheck=False)
def _dare_row(x, base, start, k0, k1, threshold, row):  # pragma: no cover - compiled
    """row = x - base (a row of the stored inputs); its L1 norm, then its random keep mask (elements
    start + j), then its L1 norm again: returns (full, kept)."""
    difference(x, base, row)
    full = row_abs_sum(row)
    mask_const(start, k0, k1, threshold, row)
    return full, row_abs_sum(row)


@njit(cache=True, nogil=True, boundscheck=False)
def dare_rows(x, base, row_len, start, k0, k1, threshold, out, full, kept):  # pragma: no cover - compiled
    """DARE's task vector rows of the flat stored arrays x and base into ``out`` (_dare_row per row),
    with each row's L1 norm before and after the mask in full and kept."""
    for r in range(full.shape[0]):
        s = r * row_len
        row = out[s : s + row_len]
        full[r], kept[r] = _dare_row(
            x[s : s + row_len], base[s : s + row_len], start + np.uint64(s), k0, k1, threshold, row
        )


@njit(cache=True, nogil=True, boundscheck=False)
def dare_norms(x, base, row_len, start, k0, k1, threshold, full, kept):  # pragma: no cover - compiled
    """dare_rows' norms without its output: one row of scratch."""
    row = np.empty(row_len, dtype=np.float32)
    for r in range(full.shape[0]):
        s = r * row_len
        full[r], kept[r] = _dare_row(
            x[s : s + row_len], base[s : s + row_len], start + np.uint64(s), k0, k1, threshold, row
        )


def combine(
    deltas: list[np.ndarray], weights, consensus: bool, normalize: bool, lam: float, base, scales=None
):
    """TaskArithmeticKernel._combine on CPU data in one compiled pass: the same float32 steps in the same
    order. ``scales`` (one per task vector, default 1) multiply each task vector first (DARE's rescale)."""
    out = np.empty(base.shape[0], dtype=np.float32)
    flat = tuple(d.reshape(-1) for d in deltas)
    sc = np.ones(len(deltas), dtype=np.float32) if scales is None else np.asarray(scales, dtype=np.float32)
    combine_kernel(flat, sc, *_combine_args(weights, consensus, normalize, lam), base, out)
    return out


def _combine_args(weights, consensus: bool, normalize: bool, lam: float) -> tuple:
    """combine_kernel's arguments after the scales: weights, consensus, normalize, whether every weight is
    positive, the divisor of a plain sum (0: none), lambda."""
    total = float(sum(weights))
    divide = np.float32(total if normalize and abs(total) >= 1e-8 else 0.0)
    positive = all(x > 0 for x in weights)
    return np.asarray(weights, dtype=np.float32), consensus, normalize, positive, divide, np.float32(lam)


def dare_combine(
    base: np.ndarray,
    models: list[np.ndarray],
    rng,
    keep,
    start: int,
    scales,
    weights,
    consensus: bool,
    normalize: bool,
    lam: float,
) -> np.ndarray:
    """DARE's output for stored inputs in one pass (dare_combine_kernel): each model's task vector masked
    by its random stream ``rng[i]`` (a RandomStream) with keep threshold ``keep[i]`` (rng.threshold_of),
    scaled by ``scales[i]``, then combine's steps."""
    out = np.empty(base.shape[0], dtype=np.float32)
    dare_combine_kernel(
        base,
        tuple(models),
        np.asarray([r.k0 for r in rng], dtype=np.uint32),
        np.asarray([r.k1 for r in rng], dtype=np.uint32),
        np.asarray(keep, dtype=np.uint64),
        np.uint64(start),
        np.asarray(scales, dtype=np.float32),
        *_combine_args(weights, consensus, normalize, lam),
        out,
    )
    return out


COMBINE_BLOCK = 2048  # elements combine_kernel takes at once: its per-block buffers stay in L1

# combine_kernel's steps over one block: compiled functions of their own, called on slices (inlined into
# the block loop, LLVM did not vectorise them)


@njit(nogil=True, boundscheck=False)
def _weighted_into(d, sc, w, acc, first):  # pragma: no cover - compiled
    """acc = v (first) or round(acc + v), with v = round(round(d * sc) * w) per element."""
    for j in range(acc.shape[0]):
        v = np.float32(np.float32(d[j] * sc) * w)
        acc[j] = v if first else np.float32(acc[j] + v)


@njit(nogil=True, boundscheck=False)
def _elect(total, elected):  # pragma: no cover - compiled
    """elected = -1 where total's sign bit is set (negative sums and -0.0), else +1."""
    bits = total.view(np.uint32)
    for j in range(total.shape[0]):
        elected[j] = np.float32(-1.0) if bits[j] >> np.uint32(31) else np.float32(1.0)


@njit(nogil=True, boundscheck=False)
def _agree_into(d, sc, w, elected, mixed, divisor, first):  # pragma: no cover - compiled
    """The entries of one weighted task vector that agree with the elected sign, added to ``mixed``
    (clamped at 0 after the sign is multiplied in; NaN stays NaN), and w added to ``divisor`` where
    they are nonzero; ``first`` sets instead of adding."""
    zero = np.float32(0.0)
    for j in range(mixed.shape[0]):
        agree = np.float32(np.float32(np.float32(d[j] * sc) * w) * elected[j])
        agree = zero if agree < zero else agree
        step = w if agree > zero else zero
        if first:
            mixed[j] = agree
            divisor[j] = step
        else:
            mixed[j] = np.float32(mixed[j] + agree)
            divisor[j] = np.float32(divisor[j] + step)


@njit(nogil=True, boundscheck=False)
def _finish_consensus(mixed, elected, divisor, normalize, positive, lam, base, out):  # pragma: no cover
    """out = round(round(mixed * elected [/ divisor]) * lam) + base, the divisor floored at the
    smallest normal float (``positive`` weights) or 0 made 1."""
    tiny = np.float32(np.finfo(np.float32).tiny)
    one, zero = np.float32(1.0), np.float32(0.0)
    for j in range(out.shape[0]):
        v = np.float32(mixed[j] * elected[j])
        if normalize:
            dv = divisor[j]
            if positive:
                dv = tiny if dv < tiny else dv
            else:
                dv = one if dv == zero else dv
            v = np.float32(v / dv)
        out[j] = np.float32(np.float32(v * lam) + load(base, j))


@njit(nogil=True, boundscheck=False)
def _finish_sum(mixed, divide, lam, base, out):  # pragma: no cover - compiled
    """out = round(round(mixed [/ divide]) * lam) + base (no division when divide is 0)."""
    for j in range(out.shape[0]):
        v = mixed[j]
        if divide != np.float32(0.0):
            v = np.float32(v / divide)
        out[j] = np.float32(np.float32(v * lam) + load(base, j))


@njit(nogil=True, boundscheck=False)
def _combine_block(ds, s, e, sc, w, consensus, normalize, positive, divide, lam, base, out, scratch):
    """combine_kernel's steps on elements [s, e) of the task vectors ``ds`` (a tuple of arrays, or the
    rows of one), into ``out`` (the block's output); ``scratch``: four rows of COMBINE_BLOCK floats."""
    k = len(ds)
    m = e - s
    total, elected, mixed, divisor = scratch[0, :m], scratch[1, :m], scratch[2, :m], scratch[3, :m]
    if consensus:
        for i in range(k):
            _weighted_into(ds[i][s:e], sc[i], w[i], total, i == 0)
        _elect(total, elected)
        for i in range(k):
            _agree_into(ds[i][s:e], sc[i], w[i], elected, mixed, divisor, i == 0)
        _finish_consensus(mixed, elected, divisor, normalize, positive, lam, base, out)
    else:
        for i in range(k):
            _weighted_into(ds[i][s:e], sc[i], w[i], mixed, i == 0)
        _finish_sum(mixed, divide, lam, base, out)


@njit(cache=True, nogil=True, boundscheck=False)
def combine_kernel(ds, sc, w, consensus, normalize, positive, divide, lam, base, out):  # pragma: no cover
    """Per element: v_i = (d_i * sc_i) * w_i; with ``consensus`` the sign election and (normalised)
    disjoint sum of _disjoint_sum, else sum_i v_i (divided by ``divide`` unless it is 0); then * lam +
    base. Multiplying by 1 changes nothing, so unit scales and weights need no special case.

    The work goes block by block, one task vector at a time inside a block, with selects instead of
    branches, in loops that vectorise: element by element, the branches mispredicted on TIES's
    half-zero, mixed-sign task vectors (15 ns an element). Each element still sees the same float32
    operations in the same order."""
    n = out.shape[0]
    scratch = np.empty((4, COMBINE_BLOCK), dtype=np.float32)
    for s in range(0, n, COMBINE_BLOCK):
        e = min(n, s + COMBINE_BLOCK)
        _combine_block(
            ds, s, e, sc, w, consensus, normalize, positive, divide, lam, base[s:e], out[s:e], scratch
        )


@njit(cache=True, nogil=True, boundscheck=False)
def dare_combine_kernel(
    base, models, k0, k1, keep, start, sc, w, consensus, normalize, positive, divide, lam, out
):  # pragma: no cover - compiled
    """DARE's output in one pass, block by block, no task vector stored whole: for each model i,
    d_i = models[i] - base (stored inputs, converted as read), masked as ``mask_const`` masks it (element
    ``start + j`` kept when its draw under (k0[i], k1[i]) is below ``keep[i]``), then combine_kernel's
    steps. The same float32 operations, in the same order, as dare_rows for each model followed by
    combine_kernel."""
    k = len(models)
    n = out.shape[0]
    ds = np.empty((k, COMBINE_BLOCK), dtype=np.float32)
    scratch = np.empty((4, COMBINE_BLOCK), dtype=np.float32)
    for s in range(0, n, COMBINE_BLOCK):
        e = min(n, s + COMBINE_BLOCK)
        m = e - s
        for i in range(k):
            d = ds[i, :m]
            difference(models[i][s:e], base[s:e], d)
            mask_const(start + np.uint64(s), k0[i], k1[i], keep[i], d)
        _combine_block(
            ds, 0, m, sc, w, consensus, normalize, positive, divide, lam, base[s:e], out[s:e], scratch
        )


# --- whole operations, called from Python ----------------------------------------------------------


@njit(cache=True, nogil=True, boundscheck=False)
def _linear(models, w, divide, out):  # pragma: no cover - compiled
    """out = round(m_0 w_0), then fma(m_i, w_i, .) for each further model, then / divide (unless 0)."""
    for j in range(out.shape[0]):
        acc = np.float32(load(models[0], j) * w[0])
        for i in range(1, len(models)):
            acc = fma(load(models[i], j), w[i], acc)
        if divide != np.float32(0.0):
            acc = np.float32(acc / divide)
        out[j] = acc


@njit(cache=True, nogil=True, boundscheck=False)
def _task_arithmetic(base, models, w, divide, lam, out):  # pragma: no cover - compiled
    """out = (sum_i round((m_i - base) w_i)) / divide (unless 0) * lam + base, rounded step by step."""
    for j in range(out.shape[0]):
        b = load(base, j)
        acc = np.float32(np.float32(load(models[0], j) - b) * w[0])
        for i in range(1, len(models)):
            acc = np.float32(acc + np.float32(np.float32(load(models[i], j) - b) * w[i]))
        if divide != np.float32(0.0):
            acc = np.float32(acc / divide)
        out[j] = np.float32(np.float32(acc * lam) + b)


def linear(models: list[np.ndarray], weights, normalize: bool, total: float) -> np.ndarray:
    """LinearKernel's sum on flat stored arrays of one dtype, in one pass."""
    out = np.empty(models[0].shape[0], dtype=np.float32)
    divide = np.float32(total if normalize else 0.0)
    _linear(tuple(models), np.asarray(weights, dtype=np.float32), divide, out)
    return out


def task_arithmetic(
    base: np.ndarray, models: list[np.ndarray], weights, divide_by: float | None, lam: float
) -> np.ndarray:
    """TaskArithmeticKernel's sum without sparsification on flat stored arrays of one dtype, in one
    pass: sum_i round((m_i - base) * w_i), / divide_by (if given), * lambda, + base."""
    out = np.empty(base.shape[0], dtype=np.float32)
    divide = np.float32(divide_by if divide_by is not None else 0.0)
    _task_arithmetic(base, tuple(models), np.asarray(weights, dtype=np.float32), divide, np.float32(lam), out)
    return out


def warm_up() -> None:
    """Make numba ready: its first call in a process sets up the compiler and loads the cache (about
    0.15 s); the native backend calls this on a thread of its own while the first tensors are read."""
    out = np.empty(8, dtype=np.float32)
    widen(np.zeros(8, dtype=np.uint16), out)
    narrow_bf16(out.view(np.uint32), np.empty(8, dtype=np.uint16))
