"""One candidate: merge it in memory through the pipeline's own per-tensor path, then score it.

The merge is the one ``mergesmith merge`` runs: the candidate's config is planned by
:func:`mergesmith.pipeline.plan.build_plan` (the same per-tensor parameter resolution) and executed by
the same :class:`~mergesmith.pipeline.execute.Executor` and backend, whose outputs go to an in-memory sink
instead of the file writer. So the arrays scored are the bytes ``mergesmith merge best.yml`` writes.

What does not depend on the candidate is done once per process: the models' headers are opened once and
every input tensor is read once (:class:`InputCache`, which the parallel runs share: shipped to each
worker process once, or put in Ray's object store once); the model to score is built once and only its
weights are replaced per candidate.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mergesmith.core.errors import MergeError
from mergesmith.core.sizes import available_memory
from mergesmith.core.sources import open_source
from mergesmith.pipeline.backends import choose_backend, make_backend
from mergesmith.pipeline.config import load_config
from mergesmith.pipeline.execute import ExecOptions, Executor, fit_budget
from mergesmith.pipeline.plan import MergePlan, OutputTensor, build_plan

#: The merge's random seed for randomised methods (DARE): the one ``mergesmith merge`` uses when no
#: --random-seed is given, so best.yml re-merges to the same bytes with no flag.
MERGE_SEED = 0

Key = tuple
Cache = dict[Key, Any]


class CachingBackend:
    """A backend whose reads come from memory after the first: each input tensor is read from disk
    once per process. Kernels may work in place on what they are given, so each read is a copy."""

    def __init__(self, inner: Any, cache: Cache, limit: int | None = None):
        self.inner = inner
        self.cache = cache
        self.limit = cache_limit() if limit is None else limit
        self.size = sum(_nbytes(v) for v in cache.values())

    def _keep(self, key: Key, value: Any) -> None:
        """Cache ``value`` while the cache stays under its limit; past it, reads stream from disk."""
        if self.size + _nbytes(value) <= self.limit:
            self.cache[key] = value
            self.size += _nbytes(value)

    def read(self, t: OutputTensor, src, span, raw: bool):
        key = (src.model, src.tensor, span, raw, t.cast_code, t.compute_code)
        if key in self.cache:
            return _copy(self.cache[key])
        value = self.inner.read(t, src, span, raw)
        self._keep(key, _copy(value))
        return value

    def read_copy(self, t: OutputTensor, span):
        key = ("copy", t.inputs[0].model, t.inputs[0].tensor, span, False, None, None)
        if key not in self.cache:
            value = self.inner.read_copy(t, span)
            self._keep(key, value)
            return value
        return self.cache[key]  # written as is, never changed

    def finish(self, t: OutputTensor, out):
        return self.inner.finish(t, out)

    def chunk_dtype(self, t: OutputTensor):
        return self.inner.chunk_dtype(t)

    def threads(self):
        return self.inner.threads()


def cache_limit() -> int:
    """Bytes of input tensors kept in memory: half of what the machine has available (the merged model
    and the model being scored need the rest); inputs beyond it are read from disk per candidate."""
    available = available_memory()
    return available // 2 if available is not None else 4 * 2**30


def _nbytes(x: Any) -> int:
    return int(x.nbytes) if isinstance(x, np.ndarray) else int(x.numel() * x.element_size())


def _copy(x: Any) -> Any:
    return x.copy() if isinstance(x, np.ndarray) else x.clone()


class MemorySink:
    """The executor's output hook: keeps every output tensor in memory, in its output dtype."""

    def __init__(self) -> None:
        self.tensors: dict[str, Any] = {}

    def scans(self, t: OutputTensor) -> bool:
        return False

    def scan(self, t: OutputTensor, data: Any, span: Any) -> None:  # pragma: no cover - scans() is False
        pass

    def write(self, t: OutputTensor, data: Any, span: Any) -> None:
        rows = t.shape[0] if t.shape else 1
        if span is None or span == (0, rows):
            self.tensors[t.name] = data
            return
        whole = self.tensors.get(t.name)
        if whole is None:
            whole = self.tensors[t.name] = _empty_like(data, t.shape)
        whole[span[0] : span[1]] = data


def _empty_like(data: Any, shape: tuple[int, ...]) -> Any:
    if isinstance(data, np.ndarray):
        return np.empty(shape, dtype=data.dtype)
    import torch

    return torch.empty(shape, dtype=data.dtype)


class Merger:
    """In-memory merges of configs over one set of models (headers opened once, inputs read once)."""

    def __init__(self, cache: Cache | None = None, cache_bytes: int | None = None):
        self.models: dict[str, Any] = {}
        self.cache: Cache = cache if cache is not None else {}
        self.cache_bytes = cache_bytes  # None: half the available memory (cache_limit)

    def plan(self, config: dict) -> MergePlan:
        cfg = load_config(config)
        plan = build_plan(cfg, self.models)
        self.models.update(plan.models)  # opened once, shared by later plans
        return plan

    def merge(self, config: dict) -> tuple[MergePlan, dict[str, Any]]:
        """The merged tensors of ``config`` as ``mergesmith merge`` writes them (same plan, same kernels,
        same backend choice, the same seed), by output name."""
        plan = self.plan(config)
        chosen, _ = choose_backend(plan, "auto", "cpu", transformed_output=False)
        backend = CachingBackend(make_backend(chosen, plan, "cpu"), self.cache, self.cache_bytes)
        # no read-ahead: after the first candidate the caching backend serves the inputs from memory
        options = fit_budget(plan, ExecOptions(workers=1, seed=MERGE_SEED, prefetch=False))
        sink = MemorySink()
        Executor(plan, None, options, sink, backend).run()  # type: ignore[arg-type]
        return plan, sink.tensors

    def close(self) -> None:
        for m in self.models.values():
            m.close()
        self.models.clear()


def to_torch(x: Any, code: str):
    """A merged array (numpy as the native backend holds it, or torch) as a float32 torch tensor."""
    import torch

    if not isinstance(x, np.ndarray):
        return x.float()
    if code == "BF16":  # numpy holds bfloat16 as uint16
        return torch.from_numpy(x.view(np.int16).copy()).view(torch.bfloat16).float()
    if not x.flags.writeable:  # an array from Ray's object store
        x = x.copy()
    return torch.from_numpy(np.ascontiguousarray(x)).float()


@dataclass
class Scorer:
    """Scores merged weights on the search's fitness terms with one model object, loaded once."""

    terms: list[Any]  # FitnessTerm
    model_ref: str
    tokenizer_ref: str
    _model: Any = None
    _tokenizer: Any = None
    _codes: dict[str, str] = field(default_factory=dict)

    def tokenizer(self) -> Any:
        """The tokenizer the terms are scored with, loaded once."""
        if self._tokenizer is None:
            from mergesmith.eval.loading import load_tokenizer

            self._tokenizer = load_tokenizer(open_source(self.tokenizer_ref).path)
        return self._tokenizer

    def load(self) -> None:
        if self._model is None:
            from mergesmith.eval.loading import load_model

            self._model, _ = load_model(self.model_ref, self.tokenizer())

    def set_weights(self, plan: MergePlan, tensors: dict[str, Any]) -> Any:
        self.load()
        state = {t.name: to_torch(tensors[t.name], t.out_code) for t in plan.tensors}
        result = self._model.load_state_dict(state, strict=False)
        missing = [k for k in result.missing_keys if not k.endswith("lm_head.weight")]
        if result.unexpected_keys or missing:
            name = (result.unexpected_keys or missing)[0]
            raise MergeError(f"merged tensor {name!r} does not fit the model of {self.model_ref}")
        return self._model

    def score(self, plan: MergePlan, tensors: dict[str, Any]) -> dict[str, float]:
        model = self.set_weights(plan, tensors)
        return {term.name: term.score(model, self._tokenizer) for term in self.terms}


@dataclass
class Evaluation:
    """What one candidate got: every term's raw score, the fitness, and where the time went."""

    scores: dict[str, float]
    fitness: float
    merge_s: float
    score_s: float


class Evaluator:
    """Merge + score, the unit of work a worker runs."""

    def __init__(
        self,
        terms: list[Any],
        model_ref: str,
        tokenizer_ref: str,
        cache: Cache | None = None,
        score_fn: Callable[[dict[str, Any]], float] | None = None,
    ):
        self.merger = Merger(cache)
        self.scorer = Scorer(terms, model_ref, tokenizer_ref)
        self.score_fn = score_fn

    def evaluate(self, config: dict) -> Evaluation:
        t0 = time.perf_counter()
        plan, tensors = self.merger.merge(config)
        t1 = time.perf_counter()
        if self.score_fn is not None:  # a function of the merged tensors (Python API, tests)
            value = float(self.score_fn(tensors))
            return Evaluation({"fitness": value}, value, t1 - t0, time.perf_counter() - t1)
        scores = self.scorer.score(plan, tensors)
        t2 = time.perf_counter()
        return Evaluation(scores, fitness_of(self.scorer.terms, scores), t1 - t0, t2 - t1)


def fitness_of(terms: list[Any], scores: dict[str, float]) -> float:
    """Weighted sum: accuracy terms as they are, perplexity as ``-ln(ppl)`` (higher is better)."""
    total = 0.0
    for term in terms:
        v = scores[term.name]
        total += term.weight * (-math.log(v) if term.kind == "ppl" else v)
    return total
