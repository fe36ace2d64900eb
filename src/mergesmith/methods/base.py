"""What a merge method is: its parameters (``ParamSpec``), its kernel protocol (``Kernel``, ``Chunk``),
``Method`` and the registry each method module enters with ``register``. The registry is read through
:mod:`mergesmith.methods` (``get_method``), which imports every method module first."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from mergesmith.core._torch import torch
from mergesmith.core.errors import MergeError
from mergesmith.core.rng import RandomStream


class _Required:
    def __repr__(self) -> str:
        return "required"


REQUIRED: Any = _Required()


class BaseRule(Enum):
    """What a method does with ``base_model``."""

    REQUIRED = "required"  # task-vector methods: base is the reference point, other models are the inputs
    OPTIONAL = "optional"  # with a base_model, as REQUIRED (task vectors); without, every model is an input
    INPUT = "input"  # base (if any) is just one more weighted input (linear)
    NONE = "none"  # one input per tensor (passthrough)


@dataclass(frozen=True)
class Domain:
    """The values a numeric parameter may take: an interval whose ends may be open or infinite."""

    low: float = -math.inf
    high: float = math.inf
    low_open: bool = False
    high_open: bool = False

    def __contains__(self, value: float) -> bool:
        above = value > self.low if self.low_open else value >= self.low
        below = value < self.high if self.high_open else value <= self.high
        return above and below

    def __str__(self) -> str:
        if self.high == math.inf:
            return f"{'>' if self.low_open else '>='} {self.low:g}"
        if self.low == -math.inf:
            return f"{'<' if self.high_open else '<='} {self.high:g}"
        return f"{'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"


FRACTION = Domain(0.0, 1.0, low_open=True)  # (0, 1]: a share of entries kept
NON_NEGATIVE = Domain(0.0)
POSITIVE = Domain(0.0, low_open=True)


@dataclass(frozen=True)
class ParamSpec:
    name: str
    per_model: bool  # one value per input model (weight, density) rather than one per tensor (t, lambda)
    default: Any = REQUIRED
    kind: type = float
    doc: str = ""
    # the values for which the method is defined; None: any finite number (weights, lambda, t of slerp)
    domain: Domain | None = None
    # a parameter that mergekit 0.1.5's method does not take: what mergekit does instead (a config that
    # sets it merges differently there; pipeline/compat.py warns and offers mergekit's result)
    extension: str = ""


def check_domain(spec: ParamSpec, value: Any, where: str) -> None:
    """A one-line MergeError if a resolved numeric value lies outside the parameter's domain."""
    if spec.domain is None or value is None or isinstance(value, bool) or not isinstance(value, int | float):
        return
    if value not in spec.domain:
        what = f" ({spec.doc})" if spec.doc else ""
        at = f" {where}" if where else ""
        raise MergeError(f"parameter {spec.name!r}{at} is {value:g}; it must be {_in(spec.domain)}{what}")


def _in(domain: Domain) -> str:
    text = str(domain)
    return text if text[0] in "<>" else f"in {text}"


@dataclass
class Chunk:
    """Rows of one output tensor's inputs, in the compute dtype ``dtype``; ``start`` is the flat element
    offset. For a method with ``raw_inputs`` the tensors may still be in their stored floating dtype
    (bf16, fp16), and the kernel converts them as it reads them.

    ``base`` is None unless the method's BaseRule is REQUIRED, or OPTIONAL and a base_model is set.
    """

    base: torch.Tensor | None
    models: list[torch.Tensor]
    start: int
    rng: list[RandomStream] | None = None
    dtype: torch.dtype = None  # type: ignore[assignment]  # float32 when not given

    def __post_init__(self) -> None:
        if self.dtype is None:
            self.dtype = torch.float32


class Kernel:
    """Computes one output tensor from chunks of its inputs.

    ``passes`` statistic passes run first: for each pass p, ``observe(p, chunk)`` sees every chunk, then
    ``end_pass(p)``; ``end_pass`` may lower ``passes`` when a statistic is settled early (TIES's threshold
    in its first pass). Then ``apply(chunk)`` returns each output chunk. Kernels must not keep references to
    chunk tensors between calls, and may modify chunk tensors in place inside ``apply``, except read-only
    numpy inputs (``arrays.writable``: views of input bytes that other reads share).
    """

    passes: int = 0

    def __init__(self, params: Mapping[str, Any], numel: int):
        self.p = params
        self.numel = numel

    @classmethod
    def check_params(cls, params: Mapping[str, Any]) -> None:
        """Raise MergeError if one tensor's resolved parameters are invalid; the planner calls this."""

    def observe(self, pass_index: int, chunk: Chunk) -> None:  # pragma: no cover - optional
        raise NotImplementedError

    def end_pass(self, pass_index: int) -> None:
        pass

    def apply(self, chunk: Chunk) -> torch.Tensor:
        raise NotImplementedError

    def run_whole(self, chunk: Chunk) -> torch.Tensor:
        """The whole tensor in one chunk: its passes, then apply. Kernels may do this with less work."""
        self.observe_all(lambda: (chunk,))
        return self.apply(chunk)

    def observe_all(self, chunks: Callable[[], Iterable[Chunk]]) -> None:
        """Every statistic pass: ``observe`` on each chunk that ``chunks()`` yields (called anew for each
        pass), then ``end_pass``, while passes remain (end_pass may lower their number)."""
        p = 0
        while p < self.passes:
            for chunk in chunks():
                self.observe(p, chunk)
            self.end_pass(p)
            p += 1


@dataclass(frozen=True)
class Method:
    name: str
    kernel: type[Kernel]
    params: tuple[ParamSpec, ...]
    base: BaseRule
    min_models: int = 1  # non-base inputs (all inputs for BaseRule.INPUT)
    max_models: int | None = None
    random: bool = False
    chunkable: bool = True  # output chunk depends only on the same rows of the inputs (after passes)
    scratch: int = 2  # extra float buffers of chunk size that apply() needs, for the memory estimate
    # the kernel accepts inputs in their stored floating dtype and converts while computing, which saves
    # a conversion pass over every input
    raw_inputs: bool = False
    # the kernel does all its array work through methods.arrays, so the native backend (numpy, no
    # torch) can run it on float32 arrays with the same results
    native: bool = False
    summary: str = ""
    param_index: dict[str, ParamSpec] = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        object.__setattr__(self, "param_index", {p.name: p for p in self.params})


REGISTRY: dict[str, Method] = {}


def register(method: Method) -> Method:
    REGISTRY[method.name] = method
    return method


def run_kernel(method: Method, params: Mapping[str, Any], chunk: Chunk) -> torch.Tensor:
    """Run a method over one whole chunk: its passes, then apply."""
    return method.kernel(params, chunk.models[0].numel()).run_whole(chunk)


def fill_defaults(method: Method, params: Mapping[str, Any], n_models: int) -> dict[str, Any]:
    """Parameters for a kernel: defaults filled in, per-model ones as tuples, unknown names rejected."""
    out: dict[str, Any] = {}
    for key in params:
        if key not in method.param_index:
            raise MergeError(f"merge_method {method.name!r} has no parameter {key!r}")
    for spec in method.params:
        value = params.get(spec.name, spec.default)
        if value is REQUIRED:
            raise MergeError(f"merge_method {method.name!r} needs parameter {spec.name!r}")
        if spec.per_model:
            value = tuple(value) if isinstance(value, list | tuple) else (value,) * n_models
            for i, v in enumerate(value):
                check_domain(spec, v, f"of model {i}")
        else:
            check_domain(spec, value, "")
        out[spec.name] = value
    return out


KernelFactory = Callable[[Mapping[str, Any], int], Kernel]


def merge_whole(
    m: Method,
    tensors: Sequence[torch.Tensor],
    base: torch.Tensor | None = None,
    *,
    seed: int = 0,
    name: str = "tensor",
    **params: Any,
) -> torch.Tensor:
    """:func:`mergesmith.methods.merge_tensors` for a method given as its :class:`Method`."""
    resolved = fill_defaults(m, params, len(tensors))
    m.kernel.check_params(resolved)
    dtype = (
        torch.float64
        if any(t.dtype == torch.float64 for t in [*tensors, *([base] if base is not None else [])])
        else torch.float32
    )
    models = [t.to(dtype).clone() for t in tensors]
    b = base.to(dtype).clone() if base is not None else None
    rng = [RandomStream(seed, name, i) for i in range(len(models))] if m.random else None
    return run_kernel(m, resolved, Chunk(b, models, 0, rng))
