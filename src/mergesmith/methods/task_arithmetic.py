"""Task-vector methods: task arithmetic, TIES, DARE (linear and TIES variants).

With task vectors delta_i = theta_i - theta_base and weights w_i:

* task_arithmetic (Ilharco et al., ICLR 2023): out = base + lambda * sum_i w_i delta_i
* ties (Yadav et al., NeurIPS 2023): each delta_i is trimmed to its top-``density`` fraction by
  magnitude; a sign is elected per element, gamma = sign(sum_i w_i delta_i) (0 counts as +); only the
  entries that agree with it are kept, and with ``normalize`` their weighted sum is divided by the sum of
  the agreeing weights (the disjoint mean).
* dare_linear / dare_ties (Yu et al., ICML 2024): each delta_i keeps each entry with probability
  ``density`` (a Bernoulli mask); with ``rescale`` the kept entries are scaled so that the L1 norm of the
  task vector is unchanged (mergekit's convention; equal to the paper's 1/density in expectation).
  dare_ties then elects signs as TIES does.

With ``normalize``, the sum is divided by sum_i w_i (per element, over the agreeing models, when signs
are elected); then it is multiplied by ``lambda`` and added to the base.
"""

from __future__ import annotations

import torch

from mergesmith.methods import BaseRule, Chunk, Kernel, Method, ParamSpec, register
from mergesmith.methods.sparsify import TopKThreshold, keep_count

RESCALE_EPS = 1e-7


class TaskArithmeticKernel(Kernel):
    sparsify: str = "none"  # none | magnitude | random
    consensus: bool = False

    def __init__(self, params, numel):
        super().__init__(params, numel)
        densities = params["density"]
        self.selectors: list[TopKThreshold | None] = []
        self.l1_full: list[float] = []
        self.l1_kept: list[float] = []
        if self.sparsify == "magnitude":
            for d in densities:
                k = keep_count(d, numel)
                self.selectors.append(TopKThreshold(k) if 0 < k < numel else None)
            self.zeroed = [keep_count(d, numel) == 0 for d in densities]
            self.passes = 2 if any(s is not None for s in self.selectors) else 0
        elif self.sparsify == "random":
            self.l1_full = [0.0] * len(densities)
            self.l1_kept = [0.0] * len(densities)
            self.passes = 1 if params["rescale"] else 0

    # --- statistics -------------------------------------------------------------------------------
    def observe(self, pass_index: int, chunk: Chunk) -> None:
        for i, model in enumerate(chunk.models):
            delta = model - chunk.base
            if self.sparsify == "magnitude":
                sel = self.selectors[i]
                if sel is not None:
                    (sel.observe_hi if pass_index == 0 else sel.observe_lo)(delta)
            else:
                self.l1_full[i] += float(delta.abs().sum(dtype=torch.float64))
                delta.mul_(self._random_keep(chunk, i, delta))
                self.l1_kept[i] += float(delta.abs().sum(dtype=torch.float64))

    def end_pass(self, pass_index: int) -> None:
        for sel in self.selectors:
            if sel is not None:
                (sel.end_hi if pass_index == 0 else sel.end_lo)()

    def _random_keep(self, chunk: Chunk, i: int, like: torch.Tensor) -> torch.Tensor:
        u = chunk.rng[i].uniform(chunk.start, like.numel()).reshape(like.shape).to(like.device)
        return u < self.p["density"][i]

    # --- output -----------------------------------------------------------------------------------
    def _sparse_delta(self, chunk: Chunk, i: int) -> torch.Tensor:
        delta = chunk.models[i].sub_(chunk.base)  # reuse the input buffer
        density = self.p["density"][i]
        if self.sparsify == "magnitude":
            if self.zeroed[i]:
                delta.zero_()
            elif self.selectors[i] is not None:
                delta.mul_(self.selectors[i].mask(delta))
        elif self.sparsify == "random" and density < 1.0:
            delta.mul_(self._random_keep(chunk, i, delta))
            if self.p["rescale"]:
                full, kept = self.l1_full[i], self.l1_kept[i]
                if full > RESCALE_EPS and kept > RESCALE_EPS:
                    delta.mul_(full / kept)
        return delta

    def apply(self, chunk: Chunk) -> torch.Tensor:
        weights = self.p["weight"]
        deltas = []
        for i, w in enumerate(weights):
            deltas.append(self._sparse_delta(chunk, i).mul_(w))
        if self.consensus:
            mixed, divisor = _elect_and_sum(deltas, weights)
        else:
            mixed = deltas[0]
            for d in deltas[1:]:
                mixed.add_(d)
            total = float(sum(weights))
            divisor = total if abs(total) >= 1e-8 else 1.0
        if self.p["normalize"]:
            mixed.div_(divisor)
        lam = self.p["lambda"]
        if lam != 1.0:
            mixed.mul_(lam)
        return mixed.add_(chunk.base)


def _elect_and_sum(weighted: list[torch.Tensor], weights) -> tuple[torch.Tensor, torch.Tensor]:
    """Sign election by weighted mass: keep w_i delta_i where its sign equals sign(sum_j w_j delta_j).

    Returns (sum of agreeing w_i delta_i, sum of agreeing w_i with 0 replaced by 1).
    """
    total = weighted[0].clone()
    for d in weighted[1:]:
        total.add_(d)
    positive = total >= 0
    mixed = torch.zeros_like(total)
    divisor = torch.zeros_like(total)
    for w, d in zip(weights, weighted):
        agree = torch.where(positive, d > 0, d < 0)
        mixed.add_(d * agree)
        divisor.add_(agree, alpha=w)
    divisor.masked_fill_(divisor == 0, 1.0)
    return mixed, divisor


class TiesKernel(TaskArithmeticKernel):
    sparsify, consensus = "magnitude", True


class DareLinearKernel(TaskArithmeticKernel):
    sparsify, consensus = "random", False


class DareTiesKernel(TaskArithmeticKernel):
    sparsify, consensus = "random", True


def _params(normalize: bool, rescale: bool) -> tuple[ParamSpec, ...]:
    return (
        ParamSpec("weight", per_model=True, doc="scale of each model's task vector"),
        ParamSpec("density", per_model=True, default=1.0, doc="fraction of each task vector kept"),
        ParamSpec("lambda", per_model=False, default=1.0, doc="scale of the merged task vector"),
        ParamSpec(
            "normalize", per_model=False, default=normalize, kind=bool, doc="divide by the sum of weights"
        ),
        ParamSpec(
            "rescale", per_model=False, default=rescale, kind=bool, doc="keep the L1 norm after dropping"
        ),
        ParamSpec(
            "int8_mask",
            per_model=False,
            default=False,
            kind=bool,
            doc="accepted for compatibility; no effect",
        ),
    )


for _name, _kernel, _norm, _rescale, _random, _summary in (
    (
        "task_arithmetic",
        TaskArithmeticKernel,
        False,
        False,
        False,
        "base + lambda * sum of weighted task vectors",
    ),
    ("ties", TiesKernel, True, False, False, "magnitude trim, sign election, disjoint mean"),
    ("dare_linear", DareLinearKernel, False, True, True, "random drop and rescale, weighted sum"),
    ("dare_ties", DareTiesKernel, False, True, True, "random drop and rescale, sign election"),
):
    register(
        Method(
            name=_name,
            kernel=_kernel,
            params=_params(_norm, _rescale),
            base=BaseRule.REQUIRED,
            random=_random,
            scratch=4 if _kernel.consensus else 1,
            summary=_summary,
        )
    )
