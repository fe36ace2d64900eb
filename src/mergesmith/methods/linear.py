"""Linear (weighted average) merge: model soups (Wortsman et al., ICML 2022)."""

from __future__ import annotations

from mergesmith.core import loops
from mergesmith.core._torch import torch
from mergesmith.core.errors import MergeError
from mergesmith.methods import arrays
from mergesmith.methods.base import BaseRule, Chunk, Kernel, Method, ParamSpec, register


class LinearKernel(Kernel):
    """out = sum_i w_i theta_i / sum_i w_i   (plain sum_i w_i theta_i when normalize is false).

    In float32: round(w_0 theta_0), then each further term by a fused multiply-add, as mergekit's
    ``addcmul`` computes it on the CPU; then the division."""

    def apply(self, chunk: Chunk) -> torch.Tensor:
        weights = self.p["weight"]
        first = chunk.models[0]
        stored = [arrays.host_stored(m) for m in chunk.models]
        if all(x is not None and x.dtype == stored[0].dtype for x in stored):
            # CPU data: one compiled pass over all inputs, the same steps as below
            self._check_total(weights)
            return arrays.like(loops.linear(stored, weights, self.p["normalize"], sum(weights)), first)
        out = arrays.mul(arrays.as_compute(first, chunk.dtype), weights[0])
        scratch = None
        for w, t in zip(weights[1:], chunk.models[1:]):
            if arrays.is_numpy(t):
                t = arrays.as_compute(t, chunk.dtype)
            elif t.dtype != out.dtype:
                # t is bf16/fp16 (raw input): convert into a reused buffer first; torch's mixed-dtype
                # add with alpha takes a slow path, 4x slower than the copy and the add together
                scratch = torch.empty_like(out) if scratch is None else scratch
                t = scratch.copy_(t)
            arrays.axpy(out, w, t)
        if self.p["normalize"]:
            self._check_total(weights)
            arrays.div(out, sum(weights))
        return out

    def _check_total(self, weights) -> None:
        if self.p["normalize"] and abs(sum(weights)) < 1e-8:
            raise MergeError(
                f"linear: the weights {list(weights)} sum to 0; set normalize: false or change them"
            )


register(
    Method(
        name="linear",
        kernel=LinearKernel,
        params=(
            ParamSpec("weight", per_model=True, doc="weight of each model"),
            ParamSpec(
                "normalize", per_model=False, default=True, kind=bool, doc="divide by the sum of weights"
            ),
        ),
        base=BaseRule.INPUT,
        scratch=1,
        raw_inputs=True,
        native=True,
        summary="weighted average of the models",
    )
)
