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

import numpy as np

from mergesmith._torch import torch
from mergesmith.methods import BaseRule, Chunk, Kernel, Method, ParamSpec, arrays, register
from mergesmith.methods.arrays import mask_in_place
from mergesmith.methods.sparsify import TopKThreshold, keep_count
from mergesmith.methods.stats import RowL1

RESCALE_EPS = 1e-7


class TaskArithmeticKernel(Kernel):
    sparsify: str = "none"  # none | magnitude | random
    consensus: bool = False

    def __init__(self, params, numel):
        super().__init__(params, numel)
        densities = params["density"]
        self.selectors: list[TopKThreshold | None] = []
        self.threshold_passes = 0
        if self.sparsify == "magnitude":
            self.selectors = [
                TopKThreshold(k) if 0 < k < numel else None for k in (keep_count(d, numel) for d in densities)
            ]
            self.threshold_passes = 2 if any(s is not None for s in self.selectors) else 0
        n = len(densities)
        self.l1_full = [RowL1() for _ in range(n)]
        self.l1_kept = [RowL1() for _ in range(n)]
        self.rescaling = (
            bool(params["rescale"]) and self.sparsify != "none" and any(d < 1.0 for d in densities)
        )
        self.passes = self.threshold_passes + int(self.rescaling)

    # --- statistics over chunks -------------------------------------------------------------------
    def observe(self, pass_index: int, chunk: Chunk) -> None:
        _compute_base(chunk)
        for i, model in enumerate(chunk.models):
            delta = _delta_copy(model, chunk.base)  # a new tensor: apply reads model again
            if pass_index < self.threshold_passes:
                sel = self.selectors[i]
                if sel is not None:
                    (sel.observe_hi if pass_index == 0 else sel.observe_lo)(delta)
            else:
                self.l1_full[i].add(delta)
                self.l1_kept[i].add(self._drop(chunk, i, delta))

    def end_pass(self, pass_index: int) -> None:
        for sel in self.selectors:
            if sel is None:
                continue
            if pass_index == 0:
                sel.end_hi()
            elif pass_index == 1:
                sel.end_lo()
            else:
                sel.ties_seen = 0  # the L1 pass trimmed every chunk once; apply starts over

    def _random_keep(self, chunk: Chunk, i: int, like) -> np.ndarray:
        return chunk.rng[i].keep_array(
            chunk.start, like.size if arrays.is_numpy(like) else like.numel(), self.p["density"][i]
        )

    # --- output -----------------------------------------------------------------------------------
    def _drop(self, chunk: Chunk, i: int, delta: torch.Tensor) -> torch.Tensor:
        """The sparsified task vector: a new tensor (magnitude), or ``delta`` itself, changed in place."""
        density = self.p["density"][i]
        if self.sparsify == "magnitude":
            if keep_count(density, self.numel) == 0:
                return arrays.zeros_like(delta)
            sel = self.selectors[i]
            return sel.trim(delta) if sel is not None else delta
        if self.sparsify == "random" and density < 1.0:
            return mask_in_place(delta, self._random_keep(chunk, i, delta))
        return delta

    def _rescale(self, i: int, dropped: torch.Tensor) -> torch.Tensor:
        """Scale a sparsified task vector back to the L1 norm it had before dropping."""
        full, kept = self.l1_full[i].value, self.l1_kept[i].value
        if self.rescaling and full > RESCALE_EPS and kept > RESCALE_EPS and full != kept:
            arrays.mul(dropped, full / kept)
        return dropped

    def run_whole(self, chunk: Chunk) -> torch.Tensor:
        """Whole tensor in memory: each task vector is computed and sparsified once."""
        if self.sparsify not in ("none", "magnitude", "random"):  # subclasses with their own sparsifier
            return super().run_whole(chunk)
        _compute_base(chunk)
        sparse = []
        for i in range(len(chunk.models)):
            delta = _delta(chunk, i)
            if self.selectors and self.selectors[i] is not None:
                self.selectors[i].find_in(delta)
            if self.rescaling:
                self.l1_full[i].add(delta)  # before _drop, which may change delta in place
            dropped = self._drop(chunk, i, delta)
            if self.rescaling:
                self.l1_kept[i].add(dropped)
            sparse.append(self._rescale(i, dropped))
        return self._combine(chunk, sparse)

    def apply(self, chunk: Chunk) -> torch.Tensor:
        _compute_base(chunk)
        return self._combine(chunk, [self._sparse_delta(chunk, i) for i in range(len(chunk.models))])

    def _sparse_delta(self, chunk: Chunk, i: int) -> torch.Tensor:
        """Model i's task vector on this chunk, sparsified and rescaled (subclasses may override)."""
        return self._rescale(i, self._drop(chunk, i, _delta(chunk, i)))

    def _combine(self, chunk: Chunk, deltas: list[torch.Tensor]) -> torch.Tensor:
        weights = self.p["weight"]
        for w, d in zip(weights, deltas):
            if w != 1.0:
                arrays.mul(d, w)
        if self.consensus:
            mixed = _disjoint_sum(deltas, weights, self.p["normalize"])
        else:
            mixed = deltas[0]
            for d in deltas[1:]:
                arrays.add(mixed, d)
            total = float(sum(weights))
            if self.p["normalize"] and abs(total) >= 1e-8:
                arrays.div(mixed, total)
        lam = self.p["lambda"]
        if lam != 1.0:
            arrays.mul(mixed, lam)
        return arrays.add(mixed, chunk.base)


def _compute_base(chunk: Chunk) -> None:
    """Make the chunk's base the compute dtype (inputs may arrive in their stored dtype: raw_inputs;
    the native backend's chunks are float32 already)."""
    if not arrays.is_numpy(chunk.base):
        chunk.base = chunk.base.to(chunk.dtype)


def _delta_copy(model, base):
    """model - base as a new array in base's dtype (model is left as it is)."""
    if arrays.is_numpy(model):
        return np.subtract(model, base)
    return model.to(base.dtype, copy=True).sub_(base)


def _delta(chunk: Chunk, i: int):
    """theta_i - theta_base in the compute dtype, reusing model i's buffer when it already has that dtype."""
    model = chunk.models[i]
    if arrays.is_numpy(model) or model.dtype == chunk.dtype:
        return arrays.sub(model, chunk.base)
    # convert, then subtract in place: torch's mixed-dtype sub takes a slow path (several times slower)
    return model.to(chunk.dtype).sub_(chunk.base)


def _disjoint_sum(weighted: list, weights, normalize: bool):
    """Sign election by weighted mass, then the (normalised) sum of the entries that agree.

    gamma = sign(sum_i w_i delta_i), with 0 counting as +. Entry i agrees where w_i delta_i has sign gamma
    (zero never agrees). With e = +-1 the elected sign, w_i delta_i [agree] = e * relu(e * w_i delta_i).
    Returns sum_i w_i delta_i [agree], divided per element by sum_i w_i [agree] (0 -> 1) if normalize.
    """
    if arrays.is_numpy(weighted[0]):
        return _disjoint_sum_numpy(weighted, weights, normalize)
    total = torch.add(weighted[0], weighted[1]) if len(weighted) > 1 else weighted[0].clone()
    for d in weighted[2:]:
        total.add_(d)
    # copysign gives -1 only for negative sums and -0.0; a -0.0 sum means every entry is +-0, which agrees
    # with neither sign, so this equals "0 counts as +"
    elected = torch.copysign(torch.ones_like(total), total)
    mixed = divisor = None
    agreeing = total  # reused as scratch
    for w, d in zip(weights, weighted):
        torch.mul(d, elected, out=agreeing)
        agreeing.clamp_(min=0.0)
        if mixed is None:
            mixed = agreeing.clone()
            divisor = agreeing.sign().mul_(w) if normalize else None
            continue
        mixed.add_(agreeing)
        if divisor is not None:
            divisor.add_(agreeing.sign_(), alpha=w)
    mixed.mul_(elected)
    if divisor is not None:
        if all(w > 0 for w in weights):
            # the divisor is 0 exactly where nothing agrees, and there mixed is 0 too: any positive
            # floor gives 0 / floor = 0, as "0 -> 1" does, without a masked fill
            divisor.clamp_(min=torch.finfo(divisor.dtype).tiny)
        else:
            divisor.masked_fill_(divisor == 0, 1.0)
        mixed.div_(divisor)
    return mixed


def _disjoint_sum_numpy(weighted: list[np.ndarray], weights, normalize: bool) -> np.ndarray:
    """_disjoint_sum on float32 numpy arrays, step for step as the torch version (the same bits)."""
    total = np.add(weighted[0], weighted[1]) if len(weighted) > 1 else weighted[0].copy()
    for d in weighted[2:]:
        np.add(total, d, out=total)
    one = total.dtype.type(1.0)
    elected = np.copysign(one, total)
    mixed = divisor = None
    agreeing = total
    zero = total.dtype.type(0.0)
    for w, d in zip(weights, weighted):
        np.multiply(d, elected, out=agreeing)
        np.maximum(agreeing, zero, out=agreeing)
        if mixed is None:
            mixed = agreeing.copy()
            divisor = np.multiply(np.sign(agreeing), total.dtype.type(w)) if normalize else None
            continue
        np.add(mixed, agreeing, out=mixed)
        if divisor is not None:
            np.sign(agreeing, out=agreeing)
            np.add(divisor, np.multiply(agreeing, total.dtype.type(w), out=agreeing), out=divisor)
    np.multiply(mixed, elected, out=mixed)
    if divisor is not None:
        if all(w > 0 for w in weights):
            np.maximum(divisor, np.finfo(divisor.dtype).tiny, out=divisor)
        else:
            divisor[divisor == 0] = 1.0
        np.divide(mixed, divisor, out=mixed)
    return mixed


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
            raw_inputs=True,
            native=_kernel is not TiesKernel,
        )
    )
