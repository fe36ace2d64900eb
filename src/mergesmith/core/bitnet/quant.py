"""Absmean ternary quantisation (BitNet b1.58) and the rule that decides which tensors are ternarised.

BitNet b1.58 (Ma et al., 2024, "The Era of 1-bit LLMs", arXiv 2402.17764) quantises each weight matrix
``W`` (n x m) with one scalar per tensor::

    gamma = (1 / nm) * sum_ij |W_ij|                       (absmean)
    W~    = RoundClip(W / (gamma + eps), -1, +1)           RoundClip(x, a, b) = max(a, min(b, round(x)))
    W    ~= gamma * W~

The paper's ``+ eps`` only guards against division by zero. We realise it the way the reference code
does (1bitLLM ``utils_quant.py``, transformers' ``WeightQuant``, llama.cpp's converter): ``gamma`` is
clamped from below at ``eps = 1e-5`` and ``W`` is multiplied by ``1 / gamma`` in float32. The codes
are then bit-identical to what transformers computes in its online (QAT) mode, which the tests check.
The two forms only differ for weights within float rounding of a rounding threshold.

For ``W ~ N(0, s^2)``: gamma = s*sqrt(2/pi) ~= 0.798 s, and a weight becomes 0 when |w| < gamma / 2,
i.e. with probability P(|z| < sqrt(2/pi)/2) = erf(1 / (2 sqrt(pi))) ~= 0.310.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from mergesmith.core.bitnet.constants import DEFAULT_INCLUDE

EPS = 1e-5
"""Lower clamp of the absmean scale (the paper's epsilon)."""


ALWAYS_EXCLUDE: tuple[str, ...] = (r"embed", r"(^|\.)lm_head\.", r"(^|\.)output\.weight$", r"norm")
"""Never ternarised, whatever the user asks: embeddings, the LM head and norms (BitNet keeps them in
high precision; ternarising the embedding or head breaks the model)."""


@dataclass(frozen=True)
class Ternary:
    """A ternarised tensor: ``codes`` (int8 in {-1, 0, 1}, same shape as the source) and ``scale``
    (the absmean ``gamma`` as a float32 scalar tensor), so that ``W ~= scale * codes``."""

    codes: torch.Tensor
    scale: torch.Tensor

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``gamma * W~`` in ``dtype``."""
        return (self.codes.to(torch.float32) * self.scale).to(dtype)

    def zero_fraction(self) -> float:
        """Fraction of codes that are 0 (about 0.31 for a Gaussian matrix)."""
        return float((self.codes == 0).sum()) / max(self.codes.numel(), 1)


def absmean_scale(weight: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """``max(mean(|W|), eps)`` computed in float32, as a 0-d float32 tensor."""
    return weight.detach().to(torch.float32).abs().mean().clamp(min=eps)


def ternarize(weight: torch.Tensor, eps: float = EPS) -> tuple[torch.Tensor, torch.Tensor]:
    """Absmean-ternarise ``weight``: return ``(codes, scale)``.

    ``scale = max(mean|W|, eps)`` (float32, 0-d) and ``codes = clamp(round(W * (1/scale)), -1, 1)`` as
    int8, so ``W ~= scale * codes``. ``torch.round`` rounds half to even, like transformers.
    """
    if not weight.is_floating_point():
        raise TypeError(f"ternarize expects a floating-point tensor, got {weight.dtype}")
    scale = absmean_scale(weight, eps)
    codes = (weight.detach().to(torch.float32) * (1.0 / scale)).round().clamp(-1, 1).to(torch.int8)
    return codes, scale


def ternarize_tensor(weight: torch.Tensor, eps: float = EPS) -> Ternary:
    """:func:`ternarize` returning a :class:`Ternary`."""
    codes, scale = ternarize(weight, eps)
    return Ternary(codes, scale)


def as_ternary(weight: torch.Tensor, rtol: float = 1e-3) -> Ternary | None:
    """If ``weight`` already takes at most the values {-a, 0, +a} (a model trained ternary, or one
    that was dequantised from a ternary checkpoint), return it as codes and ``a``; otherwise None.

    ``rtol`` is relative to ``a`` and absorbs the rounding of ``a`` in bf16/fp16 storage.
    """
    if not weight.is_floating_point() or weight.numel() == 0:
        return None
    w = weight.detach().to(torch.float32)
    mag = w.abs()
    a = mag.max()
    if a == 0:
        return Ternary(torch.zeros_like(w, dtype=torch.int8), torch.tensor(0.0))
    nonzero = mag > 0
    if not bool(((mag[nonzero] - a).abs() <= rtol * a).all()):
        return None
    return Ternary(torch.sign(w).to(torch.int8), a)


@dataclass
class TernaryScan:
    """Running statistics of a tensor seen in row chunks, enough to ternarise it chunk by chunk the way
    ``ternary_of`` (absmean, or the tensor's own magnitude if it is already ternary) does whole::

        already ternary  <=>  max|W| - min_{W != 0} |W| <= rtol * max|W|   ->  gamma = max|W|, W~ = sign(W)
        otherwise             gamma = max(sum|W| / n, eps)  (sum in float64)  ->  W~ = RoundClip(W / gamma)

    The float64 sum makes gamma the exact mean rounded once to float32; :func:`absmean_scale` sums in
    float32, so the two can differ in the last bit, and then a weight lying within that rounding of a
    threshold ``gamma / 2`` gets the other code.
    """

    total: float = 0.0
    count: int = 0
    largest: float = 0.0
    smallest_nonzero: float = math.inf

    def update(self, chunk: torch.Tensor) -> None:
        """Add one chunk (any float dtype) to the statistics."""
        mag = chunk.detach().to(torch.float32).abs()
        if not mag.numel():
            return
        self.total += float(mag.sum(dtype=torch.float64))
        self.count += mag.numel()
        self.largest = max(self.largest, float(mag.max()))
        nonzero = mag[mag > 0]
        if nonzero.numel():
            self.smallest_nonzero = min(self.smallest_nonzero, float(nonzero.min()))

    def already_ternary(self, rtol: float = 1e-3) -> bool:
        """Whether every non-zero value had the same magnitude (within ``rtol``), as in :func:`as_ternary`."""
        return self.largest == 0 or self.largest - self.smallest_nonzero <= rtol * self.largest

    def scale(self, eps: float = EPS) -> torch.Tensor:
        """``gamma`` as a 0-d float32 tensor."""
        if self.already_ternary():
            return torch.tensor(self.largest, dtype=torch.float32)
        return torch.tensor(max(self.total / max(self.count, 1), eps), dtype=torch.float32)

    def codes(self, chunk: torch.Tensor) -> torch.Tensor:
        """int8 codes of ``chunk`` under this scale."""
        w = chunk.detach().to(torch.float32)
        if self.already_ternary():
            return torch.sign(w).to(torch.int8)
        return (w * (1.0 / self.scale())).round().clamp(-1, 1).to(torch.int8)


@dataclass(frozen=True)
class TensorSelector:
    """Decides which tensors are ternarised.

    A tensor is ternarised when it is a 2-D ``...weight``, its name matches one of ``include``, none of
    ``exclude``, and none of :data:`ALWAYS_EXCLUDE`. Patterns are Python regular expressions searched
    anywhere in the name (``re.search``), e.g. ``r"layers\\.0\\."`` or ``r"mlp\\.down_proj"``.
    """

    include: tuple[str, ...] = DEFAULT_INCLUDE
    exclude: tuple[str, ...] = ()
    _compiled: tuple[list[re.Pattern[str]], list[re.Pattern[str]]] = field(
        init=False, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        try:
            inc = [re.compile(p) for p in self.include]
            exc = [re.compile(p) for p in (*self.exclude, *ALWAYS_EXCLUDE)]
        except re.error as exc_:
            raise ValueError(f"invalid tensor pattern: {exc_}") from exc_
        object.__setattr__(self, "_compiled", (inc, exc))

    @classmethod
    def from_patterns(cls, include: Sequence[str] | None, exclude: Sequence[str] | None) -> TensorSelector:
        """``include=None`` keeps :data:`DEFAULT_INCLUDE`; ``exclude`` adds to :data:`ALWAYS_EXCLUDE`."""
        return cls(
            include=tuple(include) if include else DEFAULT_INCLUDE,
            exclude=tuple(exclude or ()),
        )

    def matches(self, name: str) -> bool:
        """Name-only part of the rule (no shape check)."""
        inc, exc = self._compiled
        if not name.endswith(".weight"):
            return False
        return any(p.search(name) for p in inc) and not any(p.search(name) for p in exc)

    def selects(self, name: str, shape: Sequence[int]) -> bool:
        """Whether tensor ``name`` of ``shape`` is ternarised (2-D linear weights only)."""
        return len(shape) == 2 and self.matches(name)


def ternary_of(weight: torch.Tensor) -> tuple[Ternary, bool]:
    """Codes and gamma of ``weight``, and whether it was already ternary ({-a, 0, a}).

    An already-ternary weight keeps its own magnitude ``a`` as gamma (absmean would give
    ``a * (1 - zero_fraction)`` and scale it wrongly).
    """
    found = as_ternary(weight)
    if found is not None:
        return found, True
    return ternarize_tensor(weight), False
