"""NearSwap: move the base towards a second model only where the two are already close.

With delta = theta_other - theta_base, elementwise:

    w   = clamp(t / max(|delta|, 1e-6), 0, 1)
    out = theta_base + w * delta = (1 - w) theta_base + w theta_other

An entry closer than ``t`` to the other model takes its value; a farther one moves exactly ``t``
towards it. From alchemonaut's QuartetAnemoi-70B-t0.0001 (model card), as mergekit's ``nearswap``.
"""

from __future__ import annotations

from mergesmith.core._torch import torch
from mergesmith.methods.base import NON_NEGATIVE, BaseRule, Chunk, Kernel, Method, ParamSpec, register

MIN_DISTANCE = 1e-6


class NearSwapKernel(Kernel):
    def apply(self, chunk: Chunk) -> torch.Tensor:
        delta = chunk.models[0].sub_(chunk.base)
        w = delta.abs().clamp_(min=MIN_DISTANCE).reciprocal_().mul_(self.p["t"]).clamp_(0.0, 1.0)
        return delta.mul_(w).add_(chunk.base)


register(
    Method(
        name="nearswap",
        kernel=NearSwapKernel,
        params=(
            ParamSpec(
                "t",
                per_model=False,
                doc="distance below which the other model's value is taken",
                domain=NON_NEGATIVE,
            ),
        ),
        base=BaseRule.REQUIRED,
        min_models=1,
        max_models=1,
        scratch=1,
        summary="take the other model's values where they are within t of the base",
    )
)
