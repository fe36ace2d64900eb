"""RAM (Reinforced Agent Merging): keep what only one model changed, average what several changed.

For task vectors delta_i = theta_i - theta_base, entry j of delta_i is *active* when |delta_i[j]| > epsilon:

    out[j] = base[j] + sum_i delta_i[j] [active_i(j)] / max(1, #{i : active_i(j)})

An entry changed by one model gets that model's full change (no dilution by averaging, which matters
for the sparse updates of RL fine-tuning); one changed by several gets their mean; an unchanged one
keeps the base. RAM: Yuan et al., "Behavior Knowledge Merge in Reinforced Agentic Models" (2026,
arXiv:2601.13572); the config name and ``epsilon`` are mergekit's ``ram``. (RAM+'s rescaling of unique
updates is not implemented.)
"""

from __future__ import annotations

from mergesmith.core._torch import torch
from mergesmith.methods.base import NON_NEGATIVE, BaseRule, Chunk, Kernel, Method, ParamSpec, register


class RamKernel(Kernel):
    def apply(self, chunk: Chunk) -> torch.Tensor:
        eps = self.p["epsilon"]
        total = torch.zeros_like(chunk.base)
        count = torch.zeros_like(chunk.base)
        for model in chunk.models:
            delta = model.sub_(chunk.base)
            active = delta.abs() > eps
            total.add_(delta.mul_(active))
            count.add_(active)
        return total.div_(count.clamp_(min=1.0)).add_(chunk.base)


register(
    Method(
        name="ram",
        kernel=RamKernel,
        params=(
            ParamSpec(
                "epsilon",
                per_model=False,
                default=1e-5,
                doc="smallest |change| that counts",
                domain=NON_NEGATIVE,
            ),
        ),
        base=BaseRule.REQUIRED,
        scratch=3,
        summary="unique changes kept whole, shared changes averaged",
    )
)
