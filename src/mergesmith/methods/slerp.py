"""Spherical linear interpolation between two models (Shoemake 1985; popular for LLM merges)."""

from __future__ import annotations

import math

from mergesmith._torch import torch
from mergesmith.methods import BaseRule, Chunk, Kernel, Method, ParamSpec, arrays, register

DOT_THRESHOLD = 0.9995
EPS = 1e-8
SUM_BLOCK = 1 << 16


def slerp_coefficients(t: float, dot: float, norm0: float, norm1: float) -> tuple[float, float]:
    """Coefficients (c0, c1) with out = c0 * v0 + c1 * v1.

    cos(Omega) = <v0, v1> / (|v0| |v1|) over the flattened tensors (a zero-norm vector counts as unit norm).
    If |cos(Omega)| > 0.9995 the vectors are (anti)parallel and plain interpolation is used:
    (1 - t, t). Otherwise c0 = sin((1 - t) Omega) / sin(Omega), c1 = sin(t Omega) / sin(Omega),
    applied to the original (unnormalised) tensors.
    """
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

    One statistics pass gathers <v0, v1>, |v0|^2 and |v1|^2 in float64 over all chunks.
    """

    passes = 1

    def __init__(self, params, numel):
        super().__init__(params, numel)
        self.dot = self.sq0 = self.sq1 = 0.0

    def observe(self, pass_index: int, chunk: Chunk) -> None:
        v0, v1 = chunk.base.reshape(-1), chunk.models[0].reshape(-1)
        # float32 dot products of blocks, summed in float64: accurate without float64 copies
        for i in range(0, v0.shape[0], SUM_BLOCK):
            a, b = v0[i : i + SUM_BLOCK], v1[i : i + SUM_BLOCK]
            self.dot += arrays.dot(a, b)
            self.sq0 += arrays.dot(a, a)
            self.sq1 += arrays.dot(b, b)

    def apply(self, chunk: Chunk) -> torch.Tensor:
        c0, c1 = slerp_coefficients(self.p["t"], self.dot, math.sqrt(self.sq0), math.sqrt(self.sq1))
        other = chunk.models[0]
        return arrays.axpy(arrays.mul(chunk.base, c0), c1, other, other)


register(
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
        native=True,
        summary="spherical interpolation between the base model and one other",
    )
)


def slerp(v0: torch.Tensor, v1: torch.Tensor, t: float) -> torch.Tensor:
    """Spherical interpolation from ``v0`` (t = 0) to ``v1`` (t = 1) over the flattened tensors."""
    from mergesmith.methods import merge_tensors

    return merge_tensors("slerp", [v1], base=v0, t=t)
