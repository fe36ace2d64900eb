"""Passthrough: copy one model's tensor, optionally scaled (frankenmerges, depth up-scaling)."""

from __future__ import annotations

from mergesmith.core._torch import torch
from mergesmith.methods.base import BaseRule, Chunk, Kernel, Method, ParamSpec, register


class PassthroughKernel(Kernel):
    """out = theta * scale   (theta unchanged when scale is not set)."""

    def apply(self, chunk: Chunk) -> torch.Tensor:
        out = chunk.models[0]
        scale = self.p["scale"][0]
        if scale is not None and scale != 1.0:
            out.mul_(scale)
        return out


register(
    Method(
        name="passthrough",
        kernel=PassthroughKernel,
        params=(ParamSpec("scale", per_model=True, default=None, doc="multiply the tensor by this"),),
        base=BaseRule.NONE,
        min_models=1,
        max_models=1,
        scratch=0,
        summary="copy one model's tensors, optionally scaled",
    )
)
