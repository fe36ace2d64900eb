"""Sparsification of task vectors: exact top-k magnitude thresholds over chunks, and DARE's random drop.

The magnitude threshold is found without sorting: |x| as float32 has a bit pattern that orders like the
value, so a 32768-bin histogram of the top 16 bits finds the bin holding the k-th largest magnitude and a
65536-bin histogram of the low 16 bits inside that bin finds it exactly. Two O(n) passes, constant
memory, and the same answer whether the tensor is seen whole or in chunks.
"""

from __future__ import annotations

import torch

HI_BINS = 1 << 15  # non-negative float32: sign bit 0, so the top 16 bits fit in 15 bits
LO_BINS = 1 << 16


def keep_count(density: float, numel: int) -> int:
    """How many elements a magnitude trim keeps: int(density * n), at least 1 unless density <= 0."""
    if density >= 1.0:
        return numel
    if density <= 0.0:
        return 0
    return max(1, int(density * numel))


def magnitude_bits(x: torch.Tensor) -> torch.Tensor:
    """The int32 bit patterns of |x| (float32), which order like the magnitudes."""
    return x.float().abs().view(torch.int32)


class TopKThreshold:
    """Finds T such that exactly the k largest |x| satisfy |x| >= T (all of any tie at T are kept)."""

    def __init__(self, k: int):
        self.k = k
        self.hi_counts = torch.zeros(HI_BINS, dtype=torch.int64)
        self.lo_counts = torch.zeros(LO_BINS, dtype=torch.int64)
        self.bin: int | None = None
        self.rank_in_bin = 0
        self.threshold_bits: int | None = None

    def observe_hi(self, x: torch.Tensor) -> None:
        hi = torch.bitwise_right_shift(magnitude_bits(x), 16).reshape(-1)
        self.hi_counts += torch.bincount(hi, minlength=HI_BINS)[:HI_BINS]

    def end_hi(self) -> None:
        # count of elements in bins >= b, for every b; the bin holding the k-th largest is the highest b
        # whose count reaches k
        at_or_above = torch.flip(torch.cumsum(torch.flip(self.hi_counts, [0]), 0), [0])
        b = int(torch.nonzero(at_or_above >= self.k).max())
        self.bin = b
        above = int(at_or_above[b + 1]) if b + 1 < HI_BINS else 0
        self.rank_in_bin = self.k - above

    def observe_lo(self, x: torch.Tensor) -> None:
        bits = magnitude_bits(x).reshape(-1)
        in_bin = bits[torch.bitwise_right_shift(bits, 16) == self.bin]
        self.lo_counts += torch.bincount(torch.bitwise_and(in_bin, 0xFFFF), minlength=LO_BINS)[:LO_BINS]

    def end_lo(self) -> None:
        at_or_above = torch.flip(torch.cumsum(torch.flip(self.lo_counts, [0]), 0), [0])
        lo = int(torch.nonzero(at_or_above >= self.rank_in_bin).max())
        self.threshold_bits = (self.bin << 16) | lo

    @property
    def threshold(self) -> float:
        assert self.threshold_bits is not None
        return torch.tensor([self.threshold_bits], dtype=torch.int32).view(torch.float32).item()

    def mask(self, x: torch.Tensor) -> torch.Tensor:
        """True where |x| is among the k largest."""
        return magnitude_bits(x) >= self.threshold_bits


def magnitude_mask(x: torch.Tensor, density: float) -> torch.Tensor:
    """Keep mask of the top ``density`` fraction of |x| (whole tensor in memory)."""
    k = keep_count(density, x.numel())
    if k >= x.numel():
        return torch.ones_like(x, dtype=torch.bool)
    if k == 0:
        return torch.zeros_like(x, dtype=torch.bool)
    sel = TopKThreshold(k)
    sel.observe_hi(x)
    sel.end_hi()
    sel.observe_lo(x)
    sel.end_lo()
    return sel.mask(x)
