"""Sparsification of task vectors: exact top-k magnitude thresholds without sorting.

|x| as float32 has a bit pattern that orders like the value, so a 32768-bin histogram of the top 16 bits
(sign dropped) finds the bin holding the k-th largest magnitude, and a 65536-bin histogram of the low 16
bits of the elements in that bin finds it exactly. Two O(n) passes, constant memory, and the same answer
whether the tensor is seen whole or in row chunks.

Exactly k elements are kept. When several elements share the k-th largest magnitude, the ones that come
first in the tensor's flat (row-major) order are kept; mergekit keeps an arbitrary subset of them (its
argsort is not stable), so the two agree on the count and on every element but such ties.
"""

from __future__ import annotations

import torch

HI_BINS = 1 << 15  # top 16 bits of a float32 with the sign bit dropped
LO_BINS = 1 << 16


def keep_count(density: float, numel: int) -> int:
    """How many elements a magnitude trim keeps: int(density * n), at least 1 unless density <= 0."""
    if density >= 1.0:
        return numel
    if density <= 0.0:
        return 0
    return max(1, int(density * numel))


def _high_bits(x: torch.Tensor) -> torch.Tensor:
    """Top 16 bits of |x| (float32), as int32 in [0, 32768)."""
    raw = x.reshape(-1).view(torch.int16)[1::2]  # little-endian: the high half of each float32
    return torch.bitwise_and(raw, 0x7FFF).to(torch.int32)


def _bits_in_bin(x: torch.Tensor, hi: torch.Tensor, b: int) -> torch.Tensor:
    """Low 16 bits of |x| for the elements whose top bits equal ``b``."""
    where = torch.nonzero(hi == b).squeeze(1)  # faster than boolean-mask indexing
    return torch.bitwise_and(x.reshape(-1).view(torch.int32).index_select(0, where), 0xFFFF)


def _top_bin(counts: torch.Tensor, k: int) -> tuple[int, int]:
    """The highest bin b with at least k elements at or above it, and k's rank inside that bin."""
    at_or_above = torch.flip(torch.cumsum(torch.flip(counts, [0]), 0), [0])
    b = int(torch.nonzero(at_or_above >= k).max())
    above = int(at_or_above[b + 1]) if b + 1 < len(counts) else 0
    return b, k - above


class TopKThreshold:
    """Finds the k-th largest magnitude T and keeps the k largest |x|: all |x| > T and, of those equal
    to T, the first ones in flat order.

    Feed every chunk to ``observe_hi``, call ``end_hi``, feed them again to ``observe_lo``, call ``end_lo``
    (or ``find_in`` on a whole tensor); then ``trim`` each chunk, in order.
    """

    def __init__(self, k: int):
        self.k = k
        self.hi_counts = torch.zeros(HI_BINS, dtype=torch.int64)
        self.lo_counts = torch.zeros(LO_BINS, dtype=torch.int64)
        self.bin = -1
        self.rank_in_bin = 0
        self.threshold_bits: int | None = None
        self.ties_to_keep = 0  # elements equal to T that are kept
        self.ties_total = 0  # elements equal to T
        self.ties_seen = 0  # elements equal to T met so far by trim()

    def observe_hi(self, x: torch.Tensor) -> None:
        self.hi_counts += torch.bincount(_high_bits(x), minlength=HI_BINS)

    def end_hi(self) -> None:
        self.bin, self.rank_in_bin = _top_bin(self.hi_counts, self.k)

    def observe_lo(self, x: torch.Tensor) -> None:
        self.lo_counts += torch.bincount(_bits_in_bin(x, _high_bits(x), self.bin), minlength=LO_BINS)

    def end_lo(self) -> None:
        lo, rank = _top_bin(self.lo_counts, self.rank_in_bin)
        self.threshold_bits = (self.bin << 16) | lo
        self.ties_to_keep = rank
        self.ties_total = int(self.lo_counts[lo])

    def find_in(self, x: torch.Tensor) -> None:
        """Both passes over one in-memory tensor, sharing the high-bits computation."""
        hi = _high_bits(x)
        self.hi_counts += torch.bincount(hi, minlength=HI_BINS)
        self.end_hi()
        self.lo_counts += torch.bincount(_bits_in_bin(x, hi, self.bin), minlength=LO_BINS)
        self.end_lo()

    @property
    def threshold(self) -> float:
        assert self.threshold_bits is not None
        return _float_of_bits(self.threshold_bits)

    def trim(self, x: torch.Tensor) -> torch.Tensor:
        """x with all but the k largest magnitudes set to 0 (a new tensor). Chunks must come in order."""
        assert self.threshold_bits is not None
        if self.threshold_bits == 0:
            out = x.clone()  # T = 0: every nonzero element is kept, zeros stay zero
        else:
            # |x| >= T  <=>  |x| > the float just below T; hardshrink keeps exactly |x| > lambda
            out = torch.nn.functional.hardshrink(x, _float_of_bits(self.threshold_bits - 1))
        if self.ties_to_keep < self.ties_total:
            out.masked_fill_(self._dropped_ties(x), 0.0)
        return out

    def _dropped_ties(self, x: torch.Tensor) -> torch.Tensor:
        """Elements equal to T beyond the first ``ties_to_keep`` of them (in flat order, across chunks)."""
        tied = x.abs().view(torch.int32) == self.threshold_bits
        budget = self.ties_to_keep - self.ties_seen
        n_tied = int(tied.sum())
        self.ties_seen += n_tied
        if budget >= n_tied:
            return torch.zeros_like(tied)
        if budget <= 0:
            return tied
        order = torch.cumsum(tied.reshape(-1), 0, dtype=torch.int32).reshape(tied.shape)
        return tied & (order > budget)

    def mask(self, x: torch.Tensor) -> torch.Tensor:
        """True where |x| is among the k largest (whole tensor)."""
        return self.trim(x.float()) != 0 if self.threshold_bits else x != 0


def _float_of_bits(bits: int) -> float:
    return torch.tensor([bits], dtype=torch.int32).view(torch.float32).item()


def magnitude_mask(x: torch.Tensor, density: float) -> torch.Tensor:
    """Keep mask of the top ``density`` fraction of |x| (whole tensor in memory)."""
    k = keep_count(density, x.numel())
    if k >= x.numel():
        return torch.ones_like(x, dtype=torch.bool)
    if k == 0:
        return torch.zeros_like(x, dtype=torch.bool)
    sel = TopKThreshold(k)
    xf = x.float().contiguous()
    sel.find_in(xf)
    return sel.mask(xf)
