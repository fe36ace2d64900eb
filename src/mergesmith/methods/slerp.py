"""Spherical linear interpolation between two models (Shoemake 1985; popular for LLM merges)."""

from __future__ import annotations

import math

import numpy as np

from mergesmith.core import loops
from mergesmith.core._torch import torch
from mergesmith.methods import arrays
from mergesmith.methods.base import BaseRule, Chunk, Kernel, Method, ParamSpec, merge_whole, register

DOT_THRESHOLD = 0.9995
EPS = 1e-8


def slerp_coefficients(t: float, dot: float, norm0: float, norm1: float) -> tuple[float, float]:
    """Coefficients (c0, c1) with out = c0 * v0 + c1 * v1.

    cos(Omega) = <v0, v1> / (|v0| |v1|) over the flattened tensors (a zero-norm vector counts as unit norm).
    If |cos(Omega)| > 0.9995 the vectors are (anti)parallel and plain interpolation is used:
    (1 - t, t). Otherwise c0 = sin((1 - t) Omega) / sin(Omega), c1 = sin(t Omega) / sin(Omega),
    applied to the original (unnormalised) tensors.

    Inputs holding NaN or Inf make the statistics non-finite; the coefficients are then NaN, so the
    output is too and the executor reports the tensor by name (as for every other method).
    """
    if not all(math.isfinite(x) for x in (dot, norm0, norm1)):
        return math.nan, math.nan
    n0 = norm0 if norm0 > EPS else 1.0
    n1 = norm1 if norm1 > EPS else 1.0
    cos = dot / (n0 * n1)
    if abs(cos) > DOT_THRESHOLD:
        return 1.0 - t, t
    omega = math.acos(max(-1.0, min(1.0, cos)))
    sin_omega = math.sin(omega)
    return math.sin((1.0 - t) * omega) / sin_omega, math.sin(t * omega) / sin_omega


class SlerpKernel(Kernel):
    """out = slerp(base, other, t); t = 0 gives the base model, t = 1 the other model.

    One statistics pass gathers <v0, v1>, |v0|^2 and |v1|^2 per row in float64 over all chunks; the
    coefficients follow from them once, at the end of the pass.
    """

    def __init__(self, params, numel):
        super().__init__(params, numel)
        self.rows: list[np.ndarray] = []  # per row: <v0, v1>, |v0|^2, |v1|^2
        t = params["t"]
        # t = 0 and t = 1 give the coefficients (1, 0) and (0, 1) whatever the angle: no statistics
        self.passes = 0 if t in (0.0, 1.0) else 1
        self.coefficients = (1.0 - t, t)

    def observe(self, pass_index: int, chunk: Chunk) -> None:
        n_rows, row_len = arrays.rows(chunk.base)
        stored = [arrays.host_stored(x) for x in (chunk.base, chunk.models[0])]
        if all(x is not None for x in stored) and stored[0].dtype == stored[1].dtype:
            out = np.empty((n_rows, 3))
            loops.row_products(stored[0], stored[1], row_len, out)
            self.rows.append(out)
            return
        v0 = arrays.as_compute(chunk.base, chunk.dtype).reshape(n_rows, -1)
        v1 = arrays.as_compute(chunk.models[0], chunk.dtype).reshape(n_rows, -1)
        if arrays.is_numpy(v0):
            v0, v1 = torch.from_numpy(v0), torch.from_numpy(v1)
        sums = [(a * b).sum(-1, dtype=torch.float64) for a, b in ((v0, v1), (v0, v0), (v1, v1))]
        self.rows.append(torch.stack(sums, -1).cpu().numpy())

    def end_pass(self, pass_index: int) -> None:
        """The coefficients from the rows' float64 sums, added exactly: the same however the tensor
        is chunked."""
        rows = np.concatenate(self.rows) if self.rows else np.zeros((0, 3))
        dot, sq0, sq1 = (math.fsum(rows[:, k].tolist()) for k in range(3))
        self.coefficients = slerp_coefficients(self.p["t"], dot, math.sqrt(sq0), math.sqrt(sq1))

    def apply(self, chunk: Chunk) -> torch.Tensor:
        c0, c1 = self.coefficients
        stored = [arrays.host_stored(x) for x in (chunk.base, chunk.models[0])]
        if all(x is not None for x in stored) and stored[0].dtype == stored[1].dtype:
            out = np.empty(stored[0].shape, dtype=np.float32)
            loops.interpolate(stored[0], stored[1], np.float32(c0), np.float32(c1), out)
            return arrays.like(out, chunk.base)
        base = arrays.as_compute(chunk.base, chunk.dtype)
        other = arrays.as_compute(chunk.models[0], chunk.dtype)
        return arrays.axpy(arrays.mul(base, c0), c1, other)


SLERP = register(
    Method(
        name="slerp",
        kernel=SlerpKernel,
        params=(
            ParamSpec("t", per_model=False, doc="interpolation factor: 0 is the base model, 1 the other"),
        ),
        base=BaseRule.REQUIRED,
        min_models=1,
        max_models=1,
        scratch=1,
        raw_inputs=True,
        native=True,
        summary="spherical interpolation between the base model and one other",
    )
)


def slerp(v0: torch.Tensor, v1: torch.Tensor, t: float) -> torch.Tensor:
    """Spherical interpolation from ``v0`` (t = 0) to ``v1`` (t = 1) over the flattened tensors."""
    return merge_whole(SLERP, [v1], base=v0, t=t)
