"""Model Breadcrumbs (Davari & Belilovsky, ECCV 2024, arXiv:2312.06795): drop both tails of |task vector|.

For each model i and tensor of n entries, the task vector delta_i = theta_i - theta_base keeps only its
mid-magnitude band: the ``gamma`` fraction of largest |delta_i| (outliers) and the smallest ones are
zeroed so that ``density`` of the entries survive:

    dropped_top = int(gamma * n)   (at most n - kept),  kept = int(density * n) (at least 1 if density > 0)
    mask_i      = entries ranked dropped_top + 1 .. dropped_top + kept by |delta_i|

Then, as task arithmetic: out = base + lambda * sum_i w_i mask_i delta_i (divided by sum_i w_i with
``normalize``); with ``rescale`` each masked task vector is scaled back to its L1 norm, as mergekit
does. ``breadcrumbs_ties`` elects a sign per entry first, as TIES does, and sums only the
agreeing entries (divided by the sum of the agreeing weights with ``normalize``).

The band is found with exact histogram thresholds over chunks (two passes, no sort); entries tied at
an edge are ranked as a stable sort would rank them (the later, the larger), so exactly ``kept``
entries survive. Unlike mergekit before 0.1.5 a
tensor with fewer than 1/gamma entries is not zeroed.
"""

from __future__ import annotations

from mergesmith.core._torch import torch
from mergesmith.methods.base import BaseRule, Chunk, Domain, Method, ParamSpec, register
from mergesmith.methods.sparsify import MagnitudeBand, band_counts
from mergesmith.methods.task_arithmetic import RESCALE_EPS, TaskArithmeticKernel, _params


class BreadcrumbsKernel(TaskArithmeticKernel):
    """Passes: two to find each model's band thresholds, one more for the L1 sums with ``rescale``."""

    sparsify, consensus = "band", False

    def __init__(self, params, numel):
        super().__init__(params, numel)
        self.bands = [
            MagnitudeBand(numel, *band_counts(d, g, numel))
            for d, g in zip(params["density"], params["gamma"])
        ]
        self.band_passes = max(b.passes for b in self.bands)
        self.rescaling = bool(params["rescale"]) and self.band_passes > 0
        self.passes = self.band_passes + int(self.rescaling)
        self.l1_full = [0.0] * len(self.bands)
        self.l1_kept = [0.0] * len(self.bands)

    def observe(self, pass_index: int, chunk: Chunk) -> None:
        for i, (band, model) in enumerate(zip(self.bands, chunk.models)):
            delta = model - chunk.base
            if pass_index < self.band_passes:
                if band.passes:
                    band.observe(pass_index, delta)
            else:
                self.l1_full[i] += float(delta.abs().sum(dtype=torch.float64))
                self.l1_kept[i] += float(
                    delta.mul_(band.mask(delta, chunk.start)).abs().sum(dtype=torch.float64)
                )

    def end_pass(self, pass_index: int) -> None:
        if pass_index < self.band_passes:
            for band in self.bands:
                if band.passes:
                    band.end(pass_index)

    def _sparse_delta(self, chunk: Chunk, i: int) -> torch.Tensor:
        delta = chunk.models[i].sub_(chunk.base)
        band = self.bands[i]
        if band.trivial is not True:
            delta.mul_(band.mask(delta, chunk.start))
            full, kept = self.l1_full[i], self.l1_kept[i]
            if self.rescaling and full > RESCALE_EPS and kept > RESCALE_EPS:
                delta.mul_(full / kept)
        return delta


class BreadcrumbsTiesKernel(BreadcrumbsKernel):
    consensus = True


GAMMA = ParamSpec(
    "gamma",
    per_model=True,
    default=0.01,
    doc="fraction of largest-magnitude entries dropped",
    domain=Domain(0.0, 1.0, high_open=True),
)

for _name, _kernel, _summary in (
    ("breadcrumbs", BreadcrumbsKernel, "drop the largest and smallest task-vector entries, weighted sum"),
    ("breadcrumbs_ties", BreadcrumbsTiesKernel, "drop both magnitude tails, then sign election"),
):
    register(
        Method(
            name=_name,
            kernel=_kernel,
            params=(*_params(normalize=False, rescale=False), GAMMA),
            base=BaseRule.REQUIRED,
            scratch=4 if _kernel.consensus else 1,
            summary=_summary,
        )
    )
