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

from mergesmith.core import loops
from mergesmith.core._torch import torch
from mergesmith.core.rng import threshold_of
from mergesmith.methods import arrays
from mergesmith.methods.arrays import mask_in_place
from mergesmith.methods.base import FRACTION, BaseRule, Chunk, Kernel, Method, ParamSpec, register
from mergesmith.methods.sparsify import TopKThreshold, keep_count
from mergesmith.methods.stats import RowL1

RESCALE_EPS = 1e-7


class TaskArithmeticKernel(Kernel):
    sparsify: str = "none"  # none | magnitude | random
    consensus: bool = False
    constant_density: bool = True  # random keep masks with one probability per model (not DELLA's)

    def __init__(self, params, numel):
        super().__init__(params, numel)
        densities = params["density"]
        self.selectors: list[TopKThreshold | None] = []
        self.threshold_passes = 0
        if self.sparsify == "magnitude":
            self.selectors = [
                TopKThreshold(k, numel) if 0 < k < numel else None
                for k in (keep_count(d, numel) for d in densities)
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
        if pass_index >= self.threshold_passes and self._host_norms(chunk):
            return
        if pass_index < self.threshold_passes and self._host_counts(pass_index, chunk):
            return
        _compute_base(chunk)
        for i, model in enumerate(chunk.models):
            delta = _delta_copy(model, chunk.base)  # a new tensor: apply reads model again
            if pass_index < self.threshold_passes:
                sel = self.selectors[i]
                if sel is not None:
                    (sel.observe_hi if pass_index == 0 else sel.observe_lo)(delta)
            else:
                self._drop_measured(chunk, i, delta)

    def end_pass(self, pass_index: int) -> None:
        selectors = [sel for sel in self.selectors if sel is not None]
        for sel in selectors:
            if pass_index >= self.threshold_passes:
                sel.ties_seen = 0  # the L1 pass trimmed every chunk once; apply starts over
            elif pass_index == 0:
                sel.end_hi()
            else:
                sel.end_lo()
        if pass_index == 0 and self.threshold_passes == 2 and all(sel.found for sel in selectors):
            # the first pass settled every threshold (TopKThreshold.end_hi): no second pass
            self.threshold_passes, self.passes = 1, self.passes - 1

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
            flat = arrays.host_numpy(delta)
            if self.constant_density and flat is not None and flat.dtype == np.float32:
                chunk.rng[i].mask(flat, chunk.start, density)  # the mask drawn and applied in one pass
                return delta
            return mask_in_place(delta, self._random_keep(chunk, i, delta))
        return delta

    def _drop_measured(self, chunk: Chunk, i: int, delta):
        """_drop, adding the L1 norms of the task vector before and after to the rescale statistics."""
        self.l1_full[i].add(delta)  # before _drop, which may change delta in place
        dropped = self._drop(chunk, i, delta)
        self.l1_kept[i].add(dropped)
        return dropped

    def _scale(self, i: int) -> float:
        """The factor that brings task vector i back to the L1 norm it had before dropping (or 1)."""
        full, kept = self.l1_full[i].value, self.l1_kept[i].value
        if self.rescaling and full > RESCALE_EPS and kept > RESCALE_EPS and full != kept:
            return full / kept
        return 1.0

    def _rescale(self, i: int, dropped: torch.Tensor) -> torch.Tensor:
        """Scale a sparsified task vector back to the L1 norm it had before dropping."""
        scale = self._scale(i)
        return arrays.mul(dropped, scale) if scale != 1.0 else dropped

    def _host(self, chunk: Chunk, measure: bool):
        """Plain task arithmetic and DARE on CPU data, in compiled passes over the stored inputs
        (mergesmith.core.loops); None where the step-by-step route below must run. ``measure``: gather
        DARE's L1 norms here (a whole tensor; chunks had a statistics pass)."""
        stored = _stored_inputs(chunk)
        if stored is None:
            return None
        base, models = stored[0], stored[1:]
        weights, lam = self.p["weight"], self.p["lambda"]
        if self.sparsify == "none" and not self.consensus:
            total = float(sum(weights))
            divide = total if self.p["normalize"] and abs(total) >= 1e-8 else None
            out = loops.task_arithmetic(base, models, weights, divide, lam)
        elif self._constant_random and not measure:
            out = self._dare_combine(chunk, base, models)
        elif self._constant_random:
            deltas = []
            for i, model in enumerate(models):
                delta = np.empty(base.shape[0], dtype=np.float32)
                full, kept = self._dare_pass(chunk, i, model, base, delta)
                if measure and self.rescaling:
                    self.l1_full[i].add_rows(full)
                    self.l1_kept[i].add_rows(kept)
                deltas.append(delta)
            scales = [self._scale(i) for i in range(len(models))]
            out = loops.combine(deltas, weights, self.consensus, self.p["normalize"], lam, base, scales)
        else:
            return None
        return arrays.like(out, chunk.base)

    @property
    def _constant_random(self) -> bool:
        return self.sparsify == "random" and self.constant_density

    def _dare_combine(self, chunk: Chunk, base: np.ndarray, models: list[np.ndarray]) -> np.ndarray:
        """DARE's apply on stored CPU inputs in one compiled pass (loops.dare_combine): each task vector
        made, masked and combined block by block, none stored whole (the L1 norms of the rescale come
        from the statistics pass)."""
        return loops.dare_combine(
            base,
            models,
            chunk.rng,
            [threshold_of(d) for d in self.p["density"]],  # density >= 1: 2**32, all kept
            chunk.start,
            [self._scale(i) for i in range(len(models))],
            self.p["weight"],
            self.consensus,
            bool(self.p["normalize"]),
            self.p["lambda"],
        )

    def _host_counts(self, pass_index: int, chunk: Chunk) -> bool:
        """A threshold pass on stored CPU inputs: each task vector counted as it is made (compiled, not
        stored); False if not possible."""
        stored = _stored_inputs(chunk)
        if stored is None:
            return False
        for sel, model in zip(self.selectors, stored[1:]):
            if sel is not None:
                (sel.observe_hi_difference if pass_index == 0 else sel.observe_lo_difference)(
                    model, stored[0]
                )
        return True

    def _dare_pass(self, chunk: Chunk, i: int, model, base, out):
        """Task vector i masked into ``out`` (None: only its rows' L1 norms), and those norms before
        and after the mask."""
        n_rows, row_len = arrays.rows(chunk.base)
        full, kept = np.empty(n_rows), np.empty(n_rows)
        rng = chunk.rng[i]
        args = (row_len, np.uint64(chunk.start), rng.k0, rng.k1)
        threshold = np.uint64(threshold_of(self.p["density"][i]))  # density >= 1: 2**32, all kept
        if out is None:
            loops.dare_norms(model, base, *args, threshold, full, kept)
        else:
            loops.dare_rows(model, base, *args, threshold, out, full, kept)
        return full, kept

    def _host_norms(self, chunk: Chunk) -> bool:
        """DARE's statistics pass on CPU data (compiled, no task vectors kept); False if not possible."""
        stored = _stored_inputs(chunk)
        if stored is None or self.sparsify != "random" or not self.constant_density:
            return False
        for i, model in enumerate(stored[1:]):
            full, kept = self._dare_pass(chunk, i, model, stored[0], None)
            self.l1_full[i].add_rows(full)
            self.l1_kept[i].add_rows(kept)
        return True

    def run_whole(self, chunk: Chunk) -> torch.Tensor:
        """Whole tensor in memory: each task vector is computed and sparsified once (stored CPU inputs with
        a magnitude trim: the threshold passes count each task vector as it is made, as for chunks)."""
        if self.sparsify == "magnitude" and not self.rescaling and _stored_inputs(chunk) is not None:
            return super().run_whole(chunk)
        if (out := self._host(chunk, measure=True)) is not None:
            return out
        if self.sparsify not in ("none", "magnitude", "random"):  # subclasses with their own sparsifier
            return super().run_whole(chunk)
        _compute_base(chunk)
        sparse = []
        for i in range(len(chunk.models)):
            delta = _delta(chunk, i)
            if self.selectors and self.selectors[i] is not None:
                self.selectors[i].find_in(delta)
            dropped = self._drop_measured(chunk, i, delta) if self.rescaling else self._drop(chunk, i, delta)
            sparse.append(self._rescale(i, dropped))
        return self._combine(chunk, sparse)

    def apply(self, chunk: Chunk) -> torch.Tensor:
        if (out := self._host(chunk, measure=False)) is not None:
            return out
        _compute_base(chunk)
        return self._combine(chunk, [self._sparse_delta(chunk, i) for i in range(len(chunk.models))])

    def _sparse_delta(self, chunk: Chunk, i: int) -> torch.Tensor:
        """Model i's task vector on this chunk, sparsified and rescaled (subclasses may override)."""
        return self._rescale(i, self._drop(chunk, i, _delta(chunk, i)))

    def _combine(self, chunk: Chunk, deltas: list[torch.Tensor]) -> torch.Tensor:
        weights = self.p["weight"]
        hosted = [arrays.host_numpy(d) for d in deltas]
        base = arrays.host_stored(chunk.base)
        if base is not None and all(h is not None and h.dtype == np.float32 for h in hosted):
            out = loops.combine(hosted, weights, self.consensus, self.p["normalize"], self.p["lambda"], base)
            return arrays.like(out, chunk.base)
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


def _stored_inputs(chunk: Chunk) -> list[np.ndarray] | None:
    """Flat stored views of the base and the models when all are CPU data of one stored dtype."""
    stored = [arrays.host_stored(x) for x in (chunk.base, *chunk.models)]
    if all(x is not None and x.dtype == stored[0].dtype for x in stored):
        return stored
    return None


def _compute_base(chunk: Chunk) -> None:
    """Make the chunk's base the compute dtype (inputs may arrive in their stored dtype: raw_inputs)."""
    chunk.base = arrays.as_compute(chunk.base, chunk.dtype)


def _delta_copy(model, base):
    """model - base as a new array in base's dtype (model is left as it is)."""
    stored, flat_base = arrays.host_stored(model), arrays.host_stored(base)
    if stored is not None and flat_base is not None and flat_base.dtype == np.float32:
        out = np.empty(flat_base.shape, dtype=np.float32)
        loops.difference(stored, flat_base, out)  # converted as read: one pass
        return arrays.like(out, base)
    if arrays.is_numpy(model):
        return np.subtract(arrays.as_compute(model, base.dtype), base)
    return model.to(base.dtype, copy=True).sub_(base)


def _delta(chunk: Chunk, i: int):
    """theta_i - theta_base in the compute dtype, reusing model i's buffer when it already has that dtype
    and is ours to change (else a new array, converted as read: _delta_copy; torch's mixed-dtype sub is
    several times slower)."""
    model = chunk.models[i]
    compute = np.float32 if arrays.is_numpy(model) else chunk.dtype
    if model.dtype == compute and arrays.writable(model):
        return arrays.sub(model, chunk.base)
    return _delta_copy(model, chunk.base)


def _disjoint_sum(weighted: list, weights, normalize: bool):
    """Sign election by weighted mass, then the (normalised) sum of the entries that agree.

    gamma = sign(sum_i w_i delta_i), with 0 counting as +. Entry i agrees where w_i delta_i has sign gamma
    (zero never agrees). With e = +-1 the elected sign, w_i delta_i [agree] = e * relu(e * w_i delta_i).
    Returns sum_i w_i delta_i [agree], divided per element by sum_i w_i [agree] (0 -> 1) if normalize.
    """
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


class TiesKernel(TaskArithmeticKernel):
    sparsify, consensus = "magnitude", True


class DareLinearKernel(TaskArithmeticKernel):
    sparsify, consensus = "random", False


class DareTiesKernel(TaskArithmeticKernel):
    sparsify, consensus = "random", True


def _params(normalize: bool, rescale: bool) -> tuple[ParamSpec, ...]:
    return (
        ParamSpec("weight", per_model=True, doc="scale of each model's task vector"),
        ParamSpec(
            "density", per_model=True, default=1.0, doc="fraction of each task vector kept", domain=FRACTION
        ),
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
            native=True,
        )
    )
