"""Averages on the unit sphere: Multi-SLERP and the Karcher (Riemannian) mean, for any number of models.

Both results are linear combinations of the inputs, out = sum_i c_i v_i, whose coefficients depend only
on the Gram matrix G_ij = <v_i, v_j> of the flattened tensors. So one statistics pass gathers G (float64)
over row chunks, the coefficients are solved in an N-dimensional space, and ``apply`` forms the sum:
chunked tensors cost no more than whole ones.
"""

from __future__ import annotations

import math

from mergesmith.core._torch import torch
from mergesmith.core.errors import MergeError
from mergesmith.methods.base import (
    NON_NEGATIVE,
    POSITIVE,
    BaseRule,
    Chunk,
    Domain,
    Kernel,
    Method,
    ParamSpec,
    register,
)
from mergesmith.methods.model_stock import normalized_weights
from mergesmith.methods.stats import GramAccumulator, unit_gram


class _GramKernel(Kernel):
    """Gathers the Gram matrix of the inputs (task vectors when there is a base) in one pass."""

    passes = 1

    def __init__(self, params, numel):
        super().__init__(params, numel)
        self.acc: GramAccumulator | None = None
        self.coeffs: list[float] = []

    def _vectors(self, chunk: Chunk, in_place: bool) -> list[torch.Tensor]:
        if chunk.base is None:
            return chunk.models
        return [m.sub_(chunk.base) if in_place else m - chunk.base for m in chunk.models]

    def observe(self, pass_index: int, chunk: Chunk) -> None:
        if self.acc is None:
            self.acc = GramAccumulator(len(chunk.models))
        self.acc.observe(self._vectors(chunk, in_place=False))

    def end_pass(self, pass_index: int) -> None:
        self.coeffs = self.solve(self.acc.gram)

    def solve(self, gram: torch.Tensor) -> list[float]:
        raise NotImplementedError

    def apply(self, chunk: Chunk) -> torch.Tensor:
        vectors = self._vectors(chunk, in_place=True)
        out = vectors[0].mul_(self.coeffs[0])
        for c, v in zip(self.coeffs[1:], vectors[1:]):
            out.add_(v, alpha=c)
        return out if chunk.base is None else out.add_(chunk.base)


class MultiSlerpKernel(_GramKernel):
    """Multi-SLERP: the weighted mean direction on the sphere, with the weighted mean norm.

    u_i = v_i / |v_i| (0 for a zero tensor), w normalised to sum 1 with ``normalize_weights``:

        m   = sum_i w_i u_i
        out = m / |m| * sum_i w_i |v_i|          (+ base; v_i are task vectors when there is a base)

    (Projecting onto the tangent space at m/|m| and back gives m/|m| again, so this is the barycentric
    spherical interpolation mergekit's multislerp computes.) If |m| < ``eps`` the directions cancel:
    two inputs fall back to the linear mix sum_i w_i v_i, more are an error.
    """

    def solve(self, gram: torch.Tensor) -> list[float]:
        w = torch.tensor(self.p["weight"], dtype=torch.float64)
        if self.p["normalize_weights"]:
            w = torch.tensor(normalized_weights(w.tolist(), "multislerp"), dtype=torch.float64)
        norms, cos = unit_gram(gram)
        direction = w * (norms > 0)
        mean_len = math.sqrt(max(float(direction @ cos @ direction), 0.0))
        if mean_len < self.p["eps"]:
            if len(w) == 2:
                return w.tolist()
            raise MergeError(
                "multislerp: the weighted directions of the models cancel out (antipodal tensors with "
                "balancing weights); change the weights"
            )
        scale = float(w @ norms) / mean_len
        safe = torch.where(norms > 0, norms, torch.ones_like(norms))
        return (direction / safe * scale).tolist()


class KarcherKernel(_GramKernel):
    """Karcher (Frechet) mean on the unit sphere, scaled by the weighted mean norm.

    With a_i = w_i / sum_j w_j (equal weights by default) and u_i = theta_i / |theta_i|, start from
    u = normalise(sum_i a_i u_i) and repeat at most ``max_iter`` times:

        phi_i = arccos <u, u_i>
        T     = sum_i a_i phi_i / sin(phi_i) (u_i - cos(phi_i) u)     (log map; 0 for phi_i = pi)
        stop if |T| < tol, else u <- cos|T| u + sin|T| T / |T|          (exp map)

    out = u * sum_i a_i |theta_i|. Zero tensors add nothing to the direction. mergekit ignores weights.
    """

    def solve(self, gram: torch.Tensor) -> list[float]:
        a = torch.tensor(normalized_weights(self.p["weight"], "karcher"), dtype=torch.float64)
        norms, cos = unit_gram(gram)
        live = norms > 0
        if not bool(live.any()):
            return [0.0] * len(a)
        scale = float(a @ norms)
        direction = karcher_direction(a[live] / a[live].sum(), cos[live][:, live], **self._iteration())
        coeffs = torch.zeros_like(a)
        coeffs[live] = direction * scale / norms[live]
        return coeffs.tolist()

    def _iteration(self) -> dict:
        return {"max_iter": int(self.p["max_iter"]), "tol": float(self.p["tol"])}


def karcher_direction(a: torch.Tensor, cos: torch.Tensor, max_iter: int, tol: float) -> torch.Tensor:
    """Coefficients c of the Karcher mean u = sum_i c_i u_i of unit vectors with cosines ``cos``."""

    def normalise(c: torch.Tensor) -> torch.Tensor | None:
        length = float(c @ cos @ c)
        return c / math.sqrt(length) if length > 1e-24 else None

    c = normalise(a.clone())
    if c is None:  # the directions cancel: start from the first one
        c = torch.zeros_like(a)
        c[0] = 1.0
    for _ in range(max_iter):
        cos_u = (cos @ c).clamp(-1.0, 1.0)
        phi = torch.arccos(cos_u)
        sin_phi = torch.sin(phi)
        factor = torch.where(
            sin_phi > 1e-12,
            phi / torch.where(sin_phi > 1e-12, sin_phi, torch.ones_like(sin_phi)),
            (phi < 1.0).to(phi.dtype),  # phi = 0: the limit 1 (the term is 0 anyway); phi = pi: undefined
        )
        tangent = a * factor - float((a * factor * cos_u).sum()) * c
        t_len = math.sqrt(max(float(tangent @ cos @ tangent), 0.0))
        if t_len < tol:
            break
        stepped = normalise(math.cos(t_len) * c + math.sin(t_len) / t_len * tangent)
        if stepped is None:
            break
        c = stepped
    return c


register(
    Method(
        name="multislerp",
        kernel=MultiSlerpKernel,
        params=(
            ParamSpec("weight", per_model=True, doc="weight of each model"),
            ParamSpec(
                "normalize_weights",
                per_model=False,
                default=True,
                kind=bool,
                doc="divide the weights by their sum",
            ),
            ParamSpec(
                "eps",
                per_model=False,
                default=1e-8,
                doc="smallest length of the mean direction",
                domain=POSITIVE,
            ),
        ),
        base=BaseRule.OPTIONAL,
        min_models=1,
        scratch=1,
        summary="barycentric spherical interpolation of any number of models",
    )
)

register(
    Method(
        name="karcher",
        kernel=KarcherKernel,
        params=(
            ParamSpec(
                "max_iter", per_model=False, default=10, kind=int, doc="most iterations", domain=Domain(1.0)
            ),
            ParamSpec(
                "tol",
                per_model=False,
                default=1e-5,
                doc="stop when the tangent step is shorter",
                domain=NON_NEGATIVE,
            ),
            ParamSpec(
                "weight",
                per_model=True,
                default=1.0,
                doc="weight of each model (mergekit: none)",
                extension="mergekit's karcher takes no weights and weighs the models equally",
            ),
        ),
        base=BaseRule.INPUT,
        min_models=1,
        scratch=1,
        summary="Riemannian (Karcher) mean of the models on the sphere",
    )
)
