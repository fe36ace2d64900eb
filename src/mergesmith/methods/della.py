"""DELLA-Merging (Deep et al., 2024, arXiv:2406.11617): magnitude-ranked random drop of task vectors.

MagPrune: in each row of a task vector delta_i = theta_i - theta_base (the last dimension; a 1-D tensor
is one row) the entries are ranked by |delta| and entry j of a row of n is kept with probability

    p_j = density - epsilon + 2 * epsilon * rank_j / (n - 1)      (rank 0 = smallest |delta|)

so larger changes are likelier to survive. With ``rescale`` the kept entries are scaled so that the task
vector keeps its L1 norm (mergekit's convention; the paper scales each kept entry by 1 / p_j, which agrees
in expectation). Then ``della`` elects signs and takes the disjoint mean as TIES does, ``della_linear``
sums: out = base + lambda * sum_i w_i delta_i (/ sum of weights with ``normalize``).

density - epsilon and density + epsilon must lie in (0, 1) (a density >= 1 keeps everything). With
epsilon = 0 this is DARE, with the very same random draws.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from mergesmith.core._torch import torch
from mergesmith.core.errors import MergeError
from mergesmith.methods.base import NON_NEGATIVE, BaseRule, Chunk, Method, ParamSpec, register
from mergesmith.methods.sparsify import rank_keep_probability
from mergesmith.methods.task_arithmetic import TaskArithmeticKernel, _params


class DellaKernel(TaskArithmeticKernel):
    """DARE's kernel with rank-based keep probabilities in place of a constant ``density``."""

    constant_density = False

    sparsify, consensus = "random", True

    def __init__(self, params, numel):
        self.check_params(params)
        super().__init__(params, numel)

    @classmethod
    def check_params(cls, params: Mapping[str, Any]) -> None:
        for density, epsilon in zip(params["density"], params["epsilon"]):
            if density < 1.0 and not (0.0 < density - epsilon and density + epsilon < 1.0):
                raise MergeError(
                    f"della: density {density:g} and epsilon {epsilon:g} give keep probabilities from "
                    f"{density - epsilon:g} to {density + epsilon:g}; choose epsilon so that both lie "
                    "strictly between 0 and 1"
                )

    def _random_keep(self, chunk: Chunk, i: int, like: torch.Tensor) -> torch.Tensor:
        p = rank_keep_probability(like, self.p["density"][i], self.p["epsilon"][i])
        return chunk.rng[i].keep(chunk.start, like.numel(), p).reshape(like.shape).to(like.device)


class DellaLinearKernel(DellaKernel):
    consensus = False


EPSILON = ParamSpec(
    "epsilon",
    per_model=True,
    default=0.15,
    doc="half-width of the keep probabilities around density",
    domain=NON_NEGATIVE,
)

for _name, _kernel, _normalize, _summary in (
    ("della", DellaKernel, True, "magnitude-ranked random drop and rescale, sign election"),
    ("della_linear", DellaLinearKernel, False, "magnitude-ranked random drop and rescale, weighted sum"),
):
    register(
        Method(
            name=_name,
            kernel=_kernel,
            params=(*_params(normalize=_normalize, rescale=True), EPSILON),
            base=BaseRule.REQUIRED,
            random=True,
            scratch=8 if _kernel.consensus else 6,  # int64 ranks and float keep probabilities
            summary=_summary,
        )
    )
