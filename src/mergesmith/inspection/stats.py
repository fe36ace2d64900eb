"""Sums over task vectors, gathered chunk by chunk, and the figures derived from them.

Every figure inspect reports is a ratio of sums that add over chunks, tensors, modules and layers:
``Sums`` holds them (float64 for the products, integers for the counts), so a tensor read in row chunks
gives the same figures as one read whole, and a layer's figures are those of the sum of its tensors.
The task vector of model i is ``tau_i = model_i - base``, both widened to float32 as the merge widens
them (so the TIES trim below sees the values the merge trims).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numba import njit

# Reductions may be reordered (SIMD); the sums are float64 of float32 values, so the order changes them by
# far less than the 6 digits reported, and a given chunk always sums in the same order.
FAST = {"reassoc", "nsz", "contract"}


@njit(cache=True, nogil=True, boundscheck=False, fastmath=FAST)
def _square_sum(x):  # pragma: no cover - compiled
    acc = 0.0
    for j in range(x.shape[0]):
        v = np.float64(x[j])
        acc += v * v
    return acc


@njit(cache=True, nogil=True, boundscheck=False, fastmath=FAST)
def _one(base, x):  # pragma: no cover - compiled
    """(<base, x>, ||x||^2, nonzero entries of x)."""
    bx = 0.0
    xx = 0.0
    nz = 0
    for j in range(x.shape[0]):
        v = np.float64(x[j])
        bx += np.float64(base[j]) * v
        xx += v * v
        nz += v != 0
    return bx, xx, nz


@njit(cache=True, nogil=True, boundscheck=False, fastmath=FAST)
def _two(x, y):  # pragma: no cover - compiled
    """(<x, y>, entries where both are nonzero, entries where their signs differ). A float32 product is
    exact in float64, so its sign is the sign comparison, without branches."""
    xy = 0.0
    both = 0
    conflicts = 0
    for j in range(x.shape[0]):
        p = np.float64(x[j]) * np.float64(y[j])
        xy += p
        both += p != 0
        conflicts += p < 0
    return xy, both, conflicts


@njit(cache=True, nogil=True, boundscheck=False, fastmath=FAST)
def _lost(x, total, w):  # pragma: no cover - compiled
    """TIES's sign election for one trimmed task vector ``x`` against ``total`` = sum_i w_i trimmed_i
    (float32; its sign is the elected one, 0 counting as +, as the merge's combine does): (entries kept,
    their squared mass, entries of the other sign: lost, their mass)."""
    kept = 0
    kept_mass = 0.0
    lost = 0
    lost_mass = 0.0
    for j in range(x.shape[0]):
        v = np.float64(x[j])
        wx = np.float32(w) * x[j]
        k = v != 0
        gone = (wx != 0) & ((wx < 0) != (total[j] < 0))
        kept += k
        kept_mass += k * v * v
        lost += gone
        lost_mass += gone * v * v
    return kept, kept_mass, lost, lost_mass


@njit(cache=True, nogil=True, boundscheck=False, fastmath=FAST)
def _trimmed(x, kept):  # pragma: no cover - compiled
    """Entries of ``x`` that are nonzero and zero in ``kept`` (the trim took them), and their mass."""
    n = 0
    mass = 0.0
    for j in range(x.shape[0]):
        v = np.float64(x[j])
        g = (v != 0) & (kept[j] == 0)
        n += g
        mass += g * v * v
    return n, mass


@njit(cache=True, nogil=True, boundscheck=False, fastmath=FAST)
def _difference_sums(base, merged, x):  # pragma: no cover - compiled
    """<merged - base, x> in float64."""
    acc = 0.0
    for j in range(x.shape[0]):
        acc += (np.float64(merged[j]) - np.float64(base[j])) * np.float64(x[j])
    return acc


@njit(cache=True, nogil=True, boundscheck=False, fastmath=FAST)
def _difference_square(base, merged):  # pragma: no cover - compiled
    acc = 0.0
    for j in range(base.shape[0]):
        d = np.float64(merged[j]) - np.float64(base[j])
        acc += d * d
    return acc


def pair_sums(s: Sums, base: np.ndarray, taus: np.ndarray) -> None:
    """Add one chunk (flat float32 base, taus of shape (models, n)) to ``s``."""
    s.bb += _square_sum(base)
    m = taus.shape[0]
    for i in range(m):
        bx, xx, nz = _one(base, taus[i])
        s.bt[i] += bx
        s.gram[i, i] += xx
        s.nnz[i] += nz
        for k in range(i + 1, m):
            xy, both, conflicts = _two(taus[i], taus[k])
            s.gram[i, k] += xy
            s.both[i, k] += both
            s.conflicts[i, k] += conflicts
    s.numel += base.shape[0]


def merged_sums(s: Sums, base: np.ndarray, merged: np.ndarray, taus: np.ndarray) -> None:
    """||merged - base||^2 and <merged - base, tau_i>, added to ``s``."""
    s.dd += _difference_square(base, merged)
    for i in range(taus.shape[0]):
        s.dt[i] += _difference_sums(base, merged, taus[i])
    s.merged_numel += base.shape[0]


def trimmed_sums(s: Sums, i: int, tau: np.ndarray, trimmed: np.ndarray) -> None:
    n, mass = _trimmed(tau, trimmed)
    s.ties_trimmed[i] += n
    s.ties_trimmed_mass[i] += mass


def election(s: Sums, trimmed: np.ndarray, weights: np.ndarray) -> None:
    """TIES's sign election over trimmed task vectors (models, n): the elected sign of an entry is that of
    sum_i w_i trimmed_i in float32, summed in model order; an entry of model i is lost when w_i trimmed_i
    is nonzero and of the other sign."""
    total = np.float32(weights[0]) * trimmed[0]
    for i in range(1, trimmed.shape[0]):
        total += np.float32(weights[i]) * trimmed[i]
    for i in range(trimmed.shape[0]):
        kept, kept_mass, lost, lost_mass = _lost(trimmed[i], total, float(weights[i]))
        s.ties_kept[i] += kept
        s.ties_kept_mass[i] += kept_mass
        s.ties_lost[i] += lost
        s.ties_lost_mass[i] += lost_mass


def _zeros(m: int, shape: tuple[int, ...] = (), dtype: Any = np.float64) -> np.ndarray:
    return np.zeros((m, *shape), dtype=dtype)


@dataclass
class Sums:
    """Additive sums over the entries of one tensor, or of a group of tensors, for ``m`` task vectors."""

    m: int
    numel: int = 0
    bb: float = 0.0  # ||base||^2
    gram: np.ndarray = field(default=None)  # type: ignore[assignment]  # <tau_i, tau_k>, upper triangle
    bt: np.ndarray = field(default=None)  # type: ignore[assignment]  # <base, tau_i>
    conflicts: np.ndarray = field(default=None)  # type: ignore[assignment]
    both: np.ndarray = field(default=None)  # type: ignore[assignment]
    nnz: np.ndarray = field(default=None)  # type: ignore[assignment]
    # TIES (only where the method is ties): entries trimmed (nonzero, set to 0), their squared mass, the
    # entries kept after the trim and their mass, the kept entries lost to the sign election and theirs
    ties_numel: int = 0
    ties_trimmed: np.ndarray = field(default=None)  # type: ignore[assignment]
    ties_trimmed_mass: np.ndarray = field(default=None)  # type: ignore[assignment]
    ties_kept: np.ndarray = field(default=None)  # type: ignore[assignment]
    ties_kept_mass: np.ndarray = field(default=None)  # type: ignore[assignment]
    ties_lost: np.ndarray = field(default=None)  # type: ignore[assignment]
    ties_lost_mass: np.ndarray = field(default=None)  # type: ignore[assignment]
    # DARE: sum of density_i * ||tau_i||^2 (the expected kept mass before rescaling), and the tau mass seen
    dare_kept_mass: np.ndarray = field(default=None)  # type: ignore[assignment]
    dare_mass: np.ndarray = field(default=None)  # type: ignore[assignment]
    # SLERP: numel-weighted sum of the per-tensor angles (degrees) between the endpoints
    slerp_angle_sum: float = 0.0
    slerp_numel: int = 0
    # --merged: ||merged - base||^2 and <merged - base, tau_i>
    merged_numel: int = 0
    dd: float = 0.0
    dt: np.ndarray = field(default=None)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        m = self.m
        for name in ("gram", "conflicts", "both"):
            if getattr(self, name) is None:
                setattr(self, name, _zeros(m, (m,), np.int64 if name != "gram" else np.float64))
        for name in (
            "bt",
            "ties_trimmed_mass",
            "ties_kept_mass",
            "ties_lost_mass",
            "dare_kept_mass",
            "dare_mass",
            "dt",
        ):
            if getattr(self, name) is None:
                setattr(self, name, _zeros(m))
        for name in ("nnz", "ties_trimmed", "ties_kept", "ties_lost"):
            if getattr(self, name) is None:
                setattr(self, name, _zeros(m, dtype=np.int64))

    def add(self, other: Sums) -> None:
        for name, value in vars(other).items():
            if name == "m":
                continue
            if isinstance(value, np.ndarray):
                getattr(self, name).__iadd__(value)
            else:
                setattr(self, name, getattr(self, name) + value)


def _ratio(a: float, b: float) -> float | None:
    return float(a / b) if b > 0 else None


def _round(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else float(f"{x:.6g}")


def figures(s: Sums, method: str | None) -> dict[str, Any]:
    """The reported figures of one tensor or group, as JSON-ready values (None where undefined: a zero
    norm, no entry where both task vectors are nonzero, a method that does not apply here).

    norm[i] = ||tau_i||; relative_norm[i] = ||tau_i|| / ||base||; cosine[i][k] = <tau_i, tau_k> /
    (||tau_i|| ||tau_k||); sign_conflict[i][k] = share of the entries where both are nonzero whose signs
    differ. See docs/inspect.md for the method and --merged figures.
    """
    m = s.m
    norms = [math.sqrt(max(0.0, float(s.gram[i, i]))) for i in range(m)]
    base_norm = math.sqrt(max(0.0, s.bb))
    cos: list[list[float | None]] = [[None] * m for _ in range(m)]
    conflict: list[list[float | None]] = [[None] * m for _ in range(m)]
    for i in range(m):
        cos[i][i] = 1.0 if norms[i] > 0 else None
        conflict[i][i] = 0.0 if s.nnz[i] else None
        for k in range(i + 1, m):
            c = _ratio(float(s.gram[i, k]), norms[i] * norms[k])
            cos[i][k] = cos[k][i] = _round(max(-1.0, min(1.0, c)) if c is not None else None)
            f = _ratio(float(s.conflicts[i, k]), float(s.both[i, k]))
            conflict[i][k] = conflict[k][i] = _round(f)
    out: dict[str, Any] = {
        "numel": int(s.numel),
        "base_norm": _round(base_norm),
        "norm": [_round(n) for n in norms],
        "relative_norm": [_round(_ratio(n, base_norm)) for n in norms],
        "nonzero": [_round(_ratio(float(s.nnz[i]), float(s.numel))) for i in range(m)],
        "cosine": cos,
        "sign_conflict": conflict,
        "method": _method_figures(s, method, norms),
        "merged": _merged_figures(s, norms, base_norm) if s.merged_numel else None,
    }
    return out


def _method_figures(s: Sums, method: str | None, norms: list[float]) -> dict[str, Any] | None:
    m = s.m
    mass = [n * n for n in norms]
    if method == "ties" and s.ties_numel:
        return {
            "ties_trimmed": [_round(_ratio(float(s.ties_trimmed[i]), float(s.ties_numel))) for i in range(m)],
            "ties_trimmed_mass": [_round(_ratio(float(s.ties_trimmed_mass[i]), mass[i])) for i in range(m)],
            "ties_sign_lost": [
                _round(_ratio(float(s.ties_lost[i]), float(s.ties_kept[i]))) for i in range(m)
            ],
            "ties_sign_lost_mass": [_round(_ratio(float(s.ties_lost_mass[i]), mass[i])) for i in range(m)],
        }
    if method in ("dare_linear", "dare_ties") and s.numel:
        return {
            "dare_expected_kept_mass": [
                _round(_ratio(float(s.dare_kept_mass[i]), float(s.dare_mass[i]))) for i in range(m)
            ]
        }
    if method == "slerp" and s.slerp_numel:
        return {"slerp_angle_degrees": _round(s.slerp_angle_sum / s.slerp_numel)}
    return None


def _merged_figures(s: Sums, norms: list[float], base_norm: float) -> dict[str, Any]:
    """Distances of the merged model (relative to ||base||) and the survival of each task vector:
    <merged - base, tau_i> / ||tau_i||^2 (1: all of tau_i is there, 0: none, as if orthogonal)."""
    m = s.m
    to_parent = [math.sqrt(max(0.0, s.dd - 2.0 * float(s.dt[i]) + norms[i] * norms[i])) for i in range(m)]
    return {
        "distance_to_base": _round(_ratio(math.sqrt(max(0.0, s.dd)), base_norm)),
        "distance_to_model": [_round(_ratio(d, base_norm)) for d in to_parent],
        "survival": [_round(_ratio(float(s.dt[i]), norms[i] * norms[i])) for i in range(m)],
    }


def slerp_angle(s: Sums) -> float | None:
    """Angle in degrees between the endpoints base and base + tau_0 of one tensor, as SLERP measures it
    (the flattened tensors; methods/slerp.py)."""
    bb, bt, tt = s.bb, float(s.bt[0]), float(s.gram[0, 0])
    other = bb + 2.0 * bt + tt
    if bb <= 0 or other <= 0:
        return None
    cos = (bb + bt) / math.sqrt(bb * other)
    return math.degrees(math.acos(max(-1.0, min(1.0, cos))))
