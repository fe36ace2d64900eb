"""NuSLERP: spherical interpolation of two models weighted like ``linear``, optionally of task vectors.

With weights w_1, w_2 the interpolation factor is t = w_2 / (w_1 + w_2) (0.5 if |w_1 + w_2| < 1e-6).
v_i are the two models, or their task vectors theta_i - theta_base when a base_model is given (then the
base is added back). For each pair of vectors a, b taken from v_1, v_2:

    cos(Omega) = <a, b> / (|a| |b|)          (a zero vector counts as unit length: cos = 0)
    out        = sin((1 - t) Omega) / sin(Omega) a + sin(t Omega) / sin(Omega) b
                 (plain (1 - t) a + t b when |sin(Omega)| < 1e-8: (anti)parallel vectors)

The pairs are the whole flattened tensors (``nuslerp_flatten``, default), or with
``nuslerp_flatten: false`` each vector along the last dimension (the rows W[i, :] of a matrix) or, with
``nuslerp_row_wise: true``, each vector along the first dimension (the columns W[:, j]). These are
mergekit's meanings (its documentation describes row_wise the other way round). The method comes from
mergekit (no paper); SLERP itself is Shoemake (1985).
"""

from __future__ import annotations

from mergesmith.core._torch import torch
from mergesmith.methods.base import BaseRule, Chunk, Kernel, Method, ParamSpec, register
from mergesmith.methods.stats import SUM_BLOCK

COLLINEAR_SIN = 1e-8
ZERO_NORM = 1e-8


def interpolation_factor(w1: float, w2: float) -> float:
    total = w1 + w2
    return 0.5 if abs(total) < 1e-6 else w2 / total


def slerp_coefficients(
    t: float, dot: torch.Tensor, sq_a: torch.Tensor, sq_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Elementwise (c_a, c_b) with out = c_a a + c_b b, from <a, b>, |a|^2 and |b|^2 (float64 tensors)."""
    norm_a, norm_b = sq_a.sqrt(), sq_b.sqrt()
    norm_a = torch.where(norm_a > ZERO_NORM, norm_a, torch.ones_like(norm_a))
    norm_b = torch.where(norm_b > ZERO_NORM, norm_b, torch.ones_like(norm_b))
    omega = torch.arccos((dot / (norm_a * norm_b)).clamp(-1.0, 1.0))
    sin_omega = torch.sin(omega)
    linear = sin_omega.abs() < COLLINEAR_SIN
    safe = torch.where(linear, torch.ones_like(sin_omega), sin_omega)
    c_a = torch.where(linear, torch.full_like(omega, 1.0 - t), torch.sin((1.0 - t) * omega) / safe)
    c_b = torch.where(linear, torch.full_like(omega, t), torch.sin(t * omega) / safe)
    return c_a, c_b


class NuSlerpKernel(Kernel):
    """Flattened or column-wise: one statistics pass (float64 sums); row-wise: none (rows are whole)."""

    def __init__(self, params, numel):
        super().__init__(params, numel)
        self.t = interpolation_factor(*params["weight"])
        self.mode = (
            "flat" if params["nuslerp_flatten"] else ("columns" if params["nuslerp_row_wise"] else "rows")
        )
        self.passes = 0 if self.mode == "rows" else 1
        self.sums: list[torch.Tensor | float] = [0.0, 0.0, 0.0]  # <a, b>, |a|^2, |b|^2

    def _pair(self, chunk: Chunk, in_place: bool) -> tuple[torch.Tensor, torch.Tensor]:
        a, b = chunk.models
        if chunk.base is not None:
            a, b = (a.sub_(chunk.base), b.sub_(chunk.base)) if in_place else (a - chunk.base, b - chunk.base)
        return a, b

    def observe(self, pass_index: int, chunk: Chunk) -> None:
        a, b = self._pair(chunk, in_place=False)
        if self.mode == "flat":
            a, b = a.reshape(-1), b.reshape(-1)
            for i in range(0, a.numel(), SUM_BLOCK):
                x, y = a[i : i + SUM_BLOCK].double(), b[i : i + SUM_BLOCK].double()
                self._add(x @ y, x @ x, y @ y)
        else:  # columns: sums over the first dimension, one per column
            self._add(*(_dim0_sum(p, q) for p, q in ((a, b), (a, a), (b, b))))

    def _add(self, *values: torch.Tensor) -> None:
        self.sums = [s + v.cpu() for s, v in zip(self.sums, values)]

    def apply(self, chunk: Chunk) -> torch.Tensor:
        a, b = self._pair(chunk, in_place=True)
        if self.mode == "rows":
            sums = [(p * q).sum(-1, keepdim=True, dtype=torch.float64) for p, q in ((a, b), (a, a), (b, b))]
        else:
            sums = [torch.as_tensor(s, dtype=torch.float64) for s in self.sums]
        c_a, c_b = (c.to(a.dtype).to(a.device) for c in slerp_coefficients(self.t, *sums))
        out = a.mul_(c_a).add_(b * c_b)
        return out if chunk.base is None else out.add_(chunk.base)


def _dim0_sum(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    return (p * q).sum(0, dtype=torch.float64) if p.dim() else (p * q).double()


register(
    Method(
        name="nuslerp",
        kernel=NuSlerpKernel,
        params=(
            ParamSpec("weight", per_model=True, doc="weight of each of the two models: t = w2 / (w1 + w2)"),
            ParamSpec(
                "nuslerp_flatten", per_model=False, default=True, kind=bool, doc="one angle per tensor"
            ),
            ParamSpec(
                "nuslerp_row_wise",
                per_model=False,
                default=False,
                kind=bool,
                doc="without flatten: interpolate columns W[:, j] instead of rows W[i, :]",
            ),
        ),
        base=BaseRule.OPTIONAL,
        min_models=2,
        max_models=2,
        scratch=2,
        summary="spherical interpolation of two models (or their task vectors), weighted",
    )
)
