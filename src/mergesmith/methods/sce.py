"""SCE: Select, Calculate, Erase (FuseChat, Wan et al., 2024, arXiv:2408.07990).

With task vectors delta_i = theta_i - theta_base (i = 1..N), per tensor:

* Select: with ``select_topk`` < 1, keep only the positions j whose variance across the models,
  var_i(delta_i[j]), is at least the int(select_topk * n)-th largest (at least 1; positions tied with
  it are all kept); zero the rest in every delta_i.
* Calculate: matrix-level coefficients c_i = w_i mean_j(delta_i[j]^2) / sum_k mean_j(delta_k[j]^2),
  from the selected deltas (w_i = ``weight``, 1 by default; mergekit has no weights here).
* Erase: elect a sign per position, s = sign(sum_i delta_i) (0 counts as +), and drop the entries that
  disagree: m_i = [sign(delta_i) = s].

    out = base + sum_i c_i m_i delta_i / sum_i c_i m_i      (a position nobody agrees on keeps the base)

The variance threshold is exact (histogram order statistic, two passes); the coefficients need one more
pass over the selected deltas.
"""

from __future__ import annotations

from mergesmith.core._torch import torch
from mergesmith.methods.base import FRACTION, BaseRule, Chunk, Kernel, Method, ParamSpec, register
from mergesmith.methods.sparsify import OrderStatistics, keep_count, magnitude_bits


def _sum(tensors: list[torch.Tensor]) -> torch.Tensor:
    total = tensors[0].clone()
    for t in tensors[1:]:
        total.add_(t)
    return total


def position_variance(deltas: list[torch.Tensor]) -> torch.Tensor:
    """Population variance across the models, per position."""
    mean = _sum(deltas).div_(len(deltas))
    var = torch.zeros_like(mean)
    for d in deltas:
        var.add_((d - mean).square_())
    return var.div_(len(deltas))


class SceKernel(Kernel):
    def __init__(self, params, numel):
        super().__init__(params, numel)
        k = keep_count(params["select_topk"], numel)
        self.selector = OrderStatistics([k]) if 0 < k < numel else None
        self.select_none = k == 0
        self.passes = 3 if self.selector is not None else 1
        self.sq_sums: list[float] = []
        self.coeffs: list[float] = []

    def _deltas(self, chunk: Chunk, in_place: bool) -> list[torch.Tensor]:
        return [m.sub_(chunk.base) if in_place else m - chunk.base for m in chunk.models]

    def _select(self, deltas: list[torch.Tensor]) -> None:
        if self.select_none:
            for d in deltas:
                d.zero_()
        elif self.selector is not None:
            keep = magnitude_bits(position_variance(deltas)) >= self.selector.bits(0)
            for d in deltas:
                d.mul_(keep)

    def observe(self, pass_index: int, chunk: Chunk) -> None:
        deltas = self._deltas(chunk, in_place=False)
        if pass_index == self.passes - 1:  # the squared sums of the selected deltas
            self._select(deltas)
            sums = [float(d.square().sum(dtype=torch.float64)) for d in deltas]
            self.sq_sums = [a + b for a, b in zip(self.sq_sums, sums)] if self.sq_sums else sums
        else:
            self.selector.observe(pass_index, position_variance(deltas))

    def end_pass(self, pass_index: int) -> None:
        if pass_index == self.passes - 1:
            weighted = [w * s for w, s in zip(self.p["weight"], self.sq_sums)]
            total = sum(self.sq_sums)
            self.coeffs = [x / total if total > 0 else 0.0 for x in weighted]
        else:
            self.selector.end(pass_index)

    def apply(self, chunk: Chunk) -> torch.Tensor:
        deltas = self._deltas(chunk, in_place=True)
        self._select(deltas)
        positive = _sum(deltas) >= 0
        mixed = torch.zeros_like(chunk.base)
        divisor = torch.zeros_like(chunk.base)
        for c, d in zip(self.coeffs, deltas):
            agree = torch.where(positive, d > 0, d < 0)
            mixed.add_(d.mul_(agree), alpha=c)
            divisor.add_(agree, alpha=c)
        divisor.masked_fill_(divisor == 0, 1.0)
        return mixed.div_(divisor).add_(chunk.base)


register(
    Method(
        name="sce",
        kernel=SceKernel,
        params=(
            ParamSpec(
                "select_topk",
                per_model=False,
                default=1.0,
                doc="fraction of highest-variance positions kept",
                domain=FRACTION,
            ),
            ParamSpec(
                "weight",
                per_model=True,
                default=1.0,
                doc="scale of each model's coefficient (mergekit: none)",
                extension="mergekit's sce takes no weights and weighs the models' coefficients equally",
            ),
            ParamSpec(
                "int8_mask",
                per_model=False,
                default=False,
                kind=bool,
                doc="accepted for compatibility; no effect",
            ),
        ),
        base=BaseRule.REQUIRED,
        scratch=5,
        summary="variance selection, energy-weighted coefficients, sign election",
    )
)
