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


@njit(cache=True, nogil=True, boundscheck=False)
def _pair_sums(base, taus, gram, bt, conflicts, both, nnz):  # pragma: no cover - compiled
    """One pass over a chunk: <tau_i, tau_k> (float64), <base, tau_i>, entries where tau_i and tau_k have
    opposite signs, entries where both are nonzero, nonzero entries of each; returns ||base||^2."""
    m, n = taus.shape
    bb = 0.0
    for j in range(n):
        b = np.float64(base[j])
        bb += b * b
        for i in range(m):
            x = taus[i, j]
            if x != 0:
                nnz[i] += 1
            xd = np.float64(x)
            bt[i] += b * xd
            gram[i, i] += xd * xd
            for k in range(i + 1, m):
                y = taus[k, j]
                gram[i, k] += xd * np.float64(y)
                if x != 0 and y != 0:
                    both[i, k] += 1
                    if (x < 0) != (y < 0):
                        conflicts[i, k] += 1
    return bb


@njit(cache=True, nogil=True, boundscheck=False)
def _merged_sums(base, merged, taus, dt):  # pragma: no cover - compiled
    """||merged - base||^2 (returned) and <merged - base, tau_i> (added to ``dt``), in float64."""
    m, n = taus.shape
    dd = 0.0
    for j in range(n):
        d = np.float64(merged[j]) - np.float64(base[j])
        dd += d * d
        for i in range(m):
            dt[i] += d * np.float64(taus[i, j])
    return dd


@njit(cache=True, nogil=True, boundscheck=False)
def _election(trimmed, weights, lost_count, lost_mass, kept, kept_mass):  # pragma: no cover - compiled
    """TIES's sign election over trimmed task vectors: the elected sign of an entry is that of
    sum_i w_i trimmed_i (float32, 0 counting as +, as the merge's combine does); an entry of model i is
    lost when w_i trimmed_i is nonzero and of the other sign. Counts and squared magnitudes (of trimmed_i)
    of the kept and of the lost entries are added per model."""
    m, n = trimmed.shape
    for j in range(n):
        s = np.float32(0.0)
        for i in range(m):
            s += np.float32(weights[i]) * trimmed[i, j]
        negative = s < 0
        for i in range(m):
            x = trimmed[i, j]
            if x == 0:
                continue
            v = np.float64(x) * np.float64(x)
            kept[i] += 1
            kept_mass[i] += v
            wx = np.float32(weights[i]) * x
            if wx != 0 and (wx < 0) != negative:
                lost_count[i] += 1
                lost_mass[i] += v


def pair_sums(s: Sums, base: np.ndarray, taus: np.ndarray) -> None:
    """Add one chunk (flat float32 base, taus of shape (models, n)) to ``s``."""
    s.bb += _pair_sums(base, taus, s.gram, s.bt, s.conflicts, s.both, s.nnz)
    s.numel += base.shape[0]


def merged_sums(s: Sums, base: np.ndarray, merged: np.ndarray, taus: np.ndarray) -> None:
    s.dd += _merged_sums(base, merged, taus, s.dt)
    s.merged_numel += base.shape[0]


def election(s: Sums, trimmed: np.ndarray, weights: np.ndarray) -> None:
    _election(trimmed, weights, s.ties_lost, s.ties_lost_mass, s.ties_kept, s.ties_kept_mass)


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
