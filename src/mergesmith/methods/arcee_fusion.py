"""Arcee Fusion (mergekit v0.1; Arcee AI blog "Meet MergeKit v0.1"): keep the base except for salient changes.

With delta = theta_ft - theta_base and softmax taken along the last dimension (per row; a 1-D tensor is
one row):

    kl[r]         = sum_j p_ft[r, j] (log p_ft[r, j] - log p_base[r, j]),  p = softmax(theta)   per row r
    importance    = |delta| * kl[row]
    threshold     = median + 1.5 (q75 - q25)      quantiles of importance over the whole tensor
    out           = theta_base + delta [importance >= threshold]

The quantiles are the order statistics at floor(q (n - 1)) (torch's "lower" interpolation), found
exactly by histogram passes. Differences from mergekit: it estimates the quantiles from 1e6 random
entries of larger tensors, here they are always exact (deterministic); it computes the KL in float32,
which for small task vectors is mostly rounding noise, here in float64; and the output keeps the
configured dtype (mergekit returns float32 whatever ``dtype`` says).
"""

from __future__ import annotations

from mergesmith.core._torch import torch
from mergesmith.methods.base import BaseRule, Chunk, Kernel, Method, register
from mergesmith.methods.sparsify import OrderStatistics

QUANTILES = (0.25, 0.5, 0.75)
IQR_FACTOR = 1.5


def importance(base: torch.Tensor, tuned: torch.Tensor) -> torch.Tensor:
    """|tuned - base| times the row's KL(softmax(tuned) || softmax(base)) (clamped at 0 against rounding)."""
    if tuned.dim() == 0:
        return importance(base.reshape(1), tuned.reshape(1)).reshape(())
    # float64: for a fine-tune's small changes the KL is a second-order quantity (~|delta|^2) left after
    # first-order terms cancel, and float32 rounding of the log-probabilities swamps it
    log_ft = torch.log_softmax(tuned.double(), dim=-1)
    log_base = torch.log_softmax(base.double(), dim=-1)
    kl = (log_ft.exp() * (log_ft - log_base)).sum(-1, keepdim=True).clamp_(min=0.0)
    return (tuned - base).abs_().mul_(kl.to(tuned.dtype))


def lower_quantile_ranks(numel: int) -> list[int]:
    """Ranks from the top (1 = largest) of the "lower" quantiles: index floor(q (n - 1)) ascending."""
    return [numel - int(q * (numel - 1)) for q in QUANTILES]


class ArceeFusionKernel(Kernel):
    passes = 2

    def __init__(self, params, numel):
        super().__init__(params, numel)
        self.stats = OrderStatistics(lower_quantile_ranks(numel))
        self.threshold = 0.0

    def observe(self, pass_index: int, chunk: Chunk) -> None:
        self.stats.observe(pass_index, importance(chunk.base, chunk.models[0]))

    def end_pass(self, pass_index: int) -> None:
        self.stats.end(pass_index)
        if pass_index == 1:
            q25, median, q75 = torch.tensor([self.stats.value(i) for i in range(len(QUANTILES))])
            self.threshold = float(median + IQR_FACTOR * (q75 - q25))  # float32 arithmetic

    def apply(self, chunk: Chunk) -> torch.Tensor:
        keep = importance(chunk.base, chunk.models[0]) >= self.threshold
        delta = chunk.models[0].sub_(chunk.base)
        return delta.mul_(keep).add_(chunk.base)


register(
    Method(
        name="arcee_fusion",
        kernel=ArceeFusionKernel,
        params=(),
        base=BaseRule.REQUIRED,
        min_models=1,
        max_models=1,
        scratch=8,  # float64 log-probabilities of a chunk
        summary="add the fine-tune's changes whose importance (|change| x row KL) is an outlier",
    )
)
