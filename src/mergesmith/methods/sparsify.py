"""Sparsification of task vectors: exact magnitude thresholds over chunks, and DELLA's keep probabilities.

The magnitude threshold is found without sorting: |x| as float32 has a bit pattern that orders like the
value, so a 32768-bin histogram of the top 16 bits finds the bin holding the k-th largest magnitude and a
65536-bin histogram of the low 16 bits inside that bin finds it exactly. Two O(n) passes, constant
memory, and the same answer whether the tensor is seen whole or in chunks. TopKThreshold finds one such
order statistic (TIES); OrderStatistics finds several at once (the two ends of a Breadcrumbs band,
quantiles); MagnitudeBand keeps the entries between two ranks.

TIES on stored CPU inputs counts each task vector as it is made (``observe_hi_difference``: never stored),
and on a tensor read in chunks its first pass also counts the low bits of the few bins where the first
chunk puts the threshold: when the whole tensor's threshold is in one of them, as it is when the chunks
are alike, the second pass (a second read of every chunk) is skipped.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

import numpy as np

from mergesmith.core import loops
from mergesmith.core._torch import torch
from mergesmith.core.loops import HI_BINS, LO_BINS
from mergesmith.methods import arrays


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


def _high_bits(x: torch.Tensor) -> torch.Tensor:
    """Top 16 bits of |x| (float32), as int32 in [0, 32768): the high half of each float, sign dropped."""
    raw = x.float().reshape(-1).view(torch.int16)[1::2]  # little-endian: the high half of each float32
    return torch.bitwise_and(raw, 0x7FFF).to(torch.int32)


def flat_nonzero(mask: torch.Tensor) -> torch.Tensor:
    """Flat indices where ``mask`` is true (int64). On the CPU numpy's is ~10x faster than torch's."""
    if mask.device.type == "cpu":
        return torch.from_numpy(np.flatnonzero(mask.numpy()))
    return torch.nonzero(mask.reshape(-1)).squeeze(1)


def _low_bits_in_bin(x: torch.Tensor, hi: torch.Tensor, b: int) -> torch.Tensor:
    """Low 16 bits of |x| for the elements whose top bits equal ``b``."""
    where = flat_nonzero(hi == b)
    return torch.bitwise_and(x.float().reshape(-1).view(torch.int32).index_select(0, where), 0xFFFF)


def _host_f32(x) -> np.ndarray | None:
    """A flat float32 numpy view (or float32 copy) of CPU data, or None for data on a device."""
    xn = arrays.host_numpy(x)
    if xn is None:
        return None
    return xn.reshape(-1) if xn.dtype == np.float32 else xn.astype(np.float32).reshape(-1)


class TopKThreshold:
    """Keeps exactly the k largest |x| of a tensor seen whole or in row chunks (TIES's trim).

    The k-th largest magnitude T comes from OrderStatistics; ``trim`` keeps every |x| > T and, of the
    entries equal to T, the last ones in flat order (ties rank as a stable sort ranks them, as ExactTop
    does). Feed every chunk to ``observe_hi``, call ``end_hi``, feed them again to ``observe_lo``, call
    ``end_lo`` (or ``find_in`` on a whole tensor); then ``trim`` each chunk, in order.
    """

    def __init__(self, k: int, numel: int | None = None):
        self.k = k
        self.stats = OrderStatistics([k], numel)
        self.threshold_bits: int | None = None
        self.ties_to_drop = 0  # entries equal to T that are not among the k largest (the earliest ones)
        self.ties_seen = 0  # entries equal to T met so far by trim()

    def observe_hi(self, x: torch.Tensor) -> None:
        self.stats.observe_hi(x)

    def end_hi(self) -> None:
        """End of the first pass; where it settled the threshold (see OrderStatistics._open_window),
        ``found`` is true and the second pass may be skipped."""
        self.stats.end_hi()
        if not self.stats.lo_pending:
            self.end_lo()

    @property
    def found(self) -> bool:
        return self.threshold_bits is not None

    def observe_lo(self, x: torch.Tensor) -> None:
        self.stats.observe_lo(x)

    def observe_hi_difference(self, x: np.ndarray, base: np.ndarray) -> None:
        self.stats.observe_hi_difference(x, base)

    def observe_lo_difference(self, x: np.ndarray, base: np.ndarray) -> None:
        self.stats.observe_lo_difference(x, base)

    def end_lo(self) -> None:
        if self.found:  # settled by the first pass
            return
        self.stats.end_lo()
        self.threshold_bits = self.stats.bits(0)
        self.ties_to_drop = self.stats.ties(0) - self.stats.ties_in_top(0)

    def find_in(self, x: torch.Tensor) -> None:
        """Both passes over one in-memory tensor, computing its high bits once."""
        hi = _high_bits(x) if arrays.host_numpy(x) is None and x.numel() > SMALL else None
        self.stats.observe_hi(x, hi)
        self.end_hi()
        self.stats.observe_lo(x, hi)
        self.end_lo()

    @property
    def threshold(self) -> float:
        assert self.threshold_bits is not None
        return _float_of_bits(self.threshold_bits)

    def trim(self, x: torch.Tensor) -> torch.Tensor:
        """x with all but the k largest magnitudes set to 0 (a new tensor). Chunks must come in order."""
        assert self.threshold_bits is not None
        xn = arrays.host_numpy(x)
        if xn is not None:
            return self._trim_host(x, xn)
        if self.threshold_bits == 0:
            out = x.clone()  # T = 0: every nonzero entry is kept, zeros stay zero
        else:
            # |x| >= T  <=>  |x| > the float just below T; hardshrink keeps exactly |x| > lambda
            out = torch.nn.functional.hardshrink(x, _float_of_bits(self.threshold_bits - 1))
        if self.ties_to_drop:
            dropped = self._dropped_ties(x)
            if dropped is not None:
                out.view(-1).index_fill_(0, dropped, 0.0)
        return out

    def _trim_host(self, x, xn: np.ndarray):
        """trim on CPU data (numpy array or CPU tensor), in the same steps as the torch version."""
        flat = np.ascontiguousarray(xn).reshape(-1)
        out = np.empty_like(flat)
        shrink = self.threshold_bits != 0  # T = 0: every nonzero entry is kept, zeros stay zero
        lam = flat.dtype.type(_float_of_bits(self.threshold_bits - 1) if shrink else 0.0)
        budget = max(0, self.ties_to_drop - self.ties_seen)
        bits = (flat if flat.dtype == np.float32 else flat.astype(np.float32)).view(np.uint32)
        self.ties_seen += loops.trim(flat, bits, lam, shrink, np.uint32(self.threshold_bits), budget, out)
        return arrays.like(out, x)

    def _dropped_ties(self, x: torch.Tensor) -> torch.Tensor | None:
        """Flat positions of the entries equal to T that are among the first ``ties_to_drop`` of them
        (in flat order, across chunks)."""
        budget = self.ties_to_drop - self.ties_seen
        if budget <= 0:
            return None
        where = flat_nonzero(magnitude_bits(x) == self.threshold_bits)
        self.ties_seen += where.numel()
        return where[:budget]


SMALL = 1 << 16  # up to this many values, OrderStatistics sorts them instead of building histograms
# The first pass of a chunked threshold also counts the low bits of the bins around the first chunk's
# estimate (OrderStatistics._open_window): at most WINDOW_BINS bins that hold values (bfloat16 task
# vectors leave most bins empty), 8.5 MiB of counts per threshold while a tensor runs.
WINDOW_BINS = 16


class OrderStatistics:
    """Exact k-th largest values of |x| over chunks, for several ranks k at once (1 = the largest).

    The same two histogram passes as TopKThreshold (the one-rank case): the first pass's histogram of
    the top 16 bits is shared by all ranks, the second pass counts the low 16 bits inside each bin that
    holds a wanted rank. Up to SMALL values in all are simply kept and sorted in the first pass (the
    histograms' fixed cost dominates there) and the second pass does nothing. ``bits(i)`` is the float32
    bit pattern of the i-th wanted value.
    """

    def __init__(self, ranks: Sequence[int], numel: int | None = None):
        self.ranks = tuple(int(k) for k in ranks)
        if any(k < 1 for k in self.ranks):
            raise ValueError(f"ranks start at 1, got {self.ranks}")
        self.numel = numel  # values in all, when known: lets observe_hi_difference keep a window
        self.hi_counts: np.ndarray | None = None
        self.bins: list[int] = []
        self.rank_in_bin: list[int] = []
        self.lo_counts: dict[int, np.ndarray] = {}
        self.lo_pending: set[int] = set()  # bins whose low bits the second pass must still count
        # while a first pass runs: (first bin, row of each bin from it, low-bit counts per row)
        self._window: tuple[int, np.ndarray, np.ndarray] | None = None
        self._small: list[np.ndarray] | None = []
        self._small_count = 0
        self._bits: list[int] = []
        self._above: list[int] = []  # how many values are strictly larger than each wanted one
        self._equal: list[int] = []  # how many values equal each wanted one

    def observe_hi(self, x: torch.Tensor, hi: torch.Tensor | None = None) -> None:
        """First pass over a chunk (a torch tensor or numpy array); ``hi`` may pass in
        ``_high_bits(x)`` of a device tensor when the caller has it. CPU data is counted by compiled
        loops, data on a device by torch; the counts are the same."""
        xf = _host_f32(x)
        if self._small is not None:
            n = x.size if arrays.is_numpy(x) else x.numel()
            if self._small_count + n <= SMALL:
                bits = (
                    np.abs(xf).view(np.int32)
                    if xf is not None
                    else magnitude_bits(x).reshape(-1).cpu().numpy()
                )
                self._small.append(bits.reshape(-1))
                self._small_count += n
                return
            self._leave_small()
        if xf is not None:
            loops.count_hi(xf.view(np.uint32), self.hi_counts)
        else:
            counts = torch.bincount(_high_bits(x) if hi is None else hi, minlength=HI_BINS)
            self.hi_counts += counts.cpu().numpy()

    def observe_hi_difference(self, x: np.ndarray, base: np.ndarray) -> None:
        """observe_hi of the task vector x - base, for flat stored CPU arrays as the compiled loops read
        them (mergesmith.core.loops), counted as it is made and never stored."""
        n = x.shape[0]
        if self._small is not None and self._small_count + n <= SMALL:  # few values: kept, so made
            delta = np.empty(n, dtype=np.float32)
            loops.difference(x, base, delta)
            self.observe_hi(delta)
            return
        first_chunk = self._small == [] and self.numel is not None and n < self.numel
        if self._small is not None:
            self._leave_small()
        assert self.hi_counts is not None
        if first_chunk:
            loops.count_hi_difference(x, base, self.hi_counts)
            self._open_window(x, base)
        elif self._window is not None:
            first, rows, window = self._window
            loops.count_hi_window_difference(x, base, self.hi_counts, np.uint32(first), rows, window)
        else:
            loops.count_hi_difference(x, base, self.hi_counts)

    def _leave_small(self) -> None:
        """More than SMALL values: the ones kept so far go into the histogram, which counts from now on."""
        assert self._small is not None
        earlier, self._small = self._small, None
        self.hi_counts = np.zeros(HI_BINS, dtype=np.int64)
        for bits in earlier:
            loops.count_hi(bits.view(np.uint32), self.hi_counts)

    def _open_window(self, x: np.ndarray, base: np.ndarray) -> None:
        """After the first of several chunks (counted in hi_counts): the bins that hold its ranks near the
        wanted one (scaled to the chunk, give or take 2 % or four standard deviations of a sampled rank),
        at most WINDOW_BINS of them, nearest first, get low-bit histograms from now on, this chunk's
        included. If the whole tensor's threshold falls in one of them (chunks alike: the usual case),
        end_hi has its low bits and the second pass is not needed; if not, the second pass counts them
        as always."""
        if len(self.ranks) != 1:
            return
        assert self.numel is not None and self.hi_counts is not None
        at_or_above = np.cumsum(self.hi_counts[::-1])[::-1]
        k = self.ranks[0] * x.shape[0] / self.numel
        margin = max(0.02 * k, 4.0 * k**0.5)

        def bin_of(rank: float) -> int:  # the bin of the rank-th largest value of this chunk
            return max(0, int((at_or_above >= max(1, round(rank))).sum()) - 1)

        guess, lo, hi = bin_of(k), bin_of(k + margin), bin_of(k - margin)
        held = np.flatnonzero(self.hi_counts[lo : hi + 1]) + lo
        bins = np.sort(held[np.argsort(np.abs(held - guess), kind="stable")[:WINDOW_BINS]])
        if bins.size == 0:
            return
        first = int(bins[0])
        rows = np.full(int(bins[-1]) - first + 1, bins.size, dtype=np.int32)  # the spare row: not counted
        rows[bins - first] = np.arange(bins.size, dtype=np.int32)
        window = np.zeros((bins.size + 1, LO_BINS), dtype=np.int64)
        dummy = np.zeros(HI_BINS, dtype=np.int64)  # this chunk's high bits are counted already
        loops.count_hi_window_difference(x, base, dummy, np.uint32(first), rows, window)
        self._window = (first, rows, window)

    def end_hi(self) -> None:
        if self._small is not None:
            ordered = np.sort(np.concatenate(self._small))[::-1] if self._small else np.empty(0, np.int32)
            self._check(ordered.size)
            self._bits = [int(ordered[k - 1]) for k in self.ranks]
            self._above = [int((ordered > b).sum()) for b in self._bits]
            self._equal = [int((ordered == b).sum()) for b in self._bits]
            return
        at_or_above = np.cumsum(self.hi_counts[::-1])[::-1]
        self._check(int(at_or_above[0]))
        for k in self.ranks:
            b = int((at_or_above >= k).sum()) - 1  # non-increasing: the last bin still holding k values
            above = int(at_or_above[b + 1]) if b + 1 < HI_BINS else 0
            self.bins.append(b)
            self.rank_in_bin.append(k - above)
        counted: dict[int, np.ndarray] = {}
        if self._window is not None:  # bins whose low bits the first pass counted
            first, rows, window = self._window
            self._window = None
            counted = {first + int(b): window[rows[b]] for b in np.flatnonzero(rows < window.shape[0] - 1)}
        self.lo_counts = {b: counted.get(b, np.zeros(LO_BINS, dtype=np.int64)) for b in set(self.bins)}
        self.lo_pending = {b for b in self.lo_counts if b not in counted}

    def _check(self, total: int) -> None:
        if any(k > total for k in self.ranks):
            raise ValueError(f"ranks {self.ranks} asked of {total} values")

    def observe_lo(self, x: torch.Tensor, hi: torch.Tensor | None = None) -> None:
        if not self.lo_pending:
            return
        xf = _host_f32(x)
        if xf is not None:
            for b in self.lo_pending:
                loops.count_lo(xf.view(np.uint32), np.uint32(b), self.lo_counts[b])
            return
        hi = _high_bits(x) if hi is None else hi
        for b in self.lo_pending:
            self.lo_counts[b][:LO_BINS] += (
                torch.bincount(_low_bits_in_bin(x, hi, b), minlength=LO_BINS).cpu().numpy()
            )

    def observe_lo_difference(self, x: np.ndarray, base: np.ndarray) -> None:
        """observe_lo of the task vector x - base (as observe_hi_difference)."""
        for b in self.lo_pending:
            loops.count_lo_difference(x, base, np.uint32(b), self.lo_counts[b])

    def end_lo(self) -> None:
        for k, b, r in zip(self.ranks, self.bins, self.rank_in_bin):
            at_or_above = np.cumsum(self.lo_counts[b][:LO_BINS][::-1])[::-1]
            lo = int((at_or_above >= r).sum()) - 1
            self._bits.append((b << 16) | lo)
            in_bin_above = int(at_or_above[lo + 1]) if lo + 1 < LO_BINS else 0
            self._above.append(k - r + in_bin_above)
            self._equal.append(int(self.lo_counts[b][lo]))
        self.lo_counts = {}
        self.lo_pending = set()

    def observe(self, pass_index: int, x: torch.Tensor) -> None:
        (self.observe_hi if pass_index == 0 else self.observe_lo)(x)

    def end(self, pass_index: int) -> None:
        (self.end_hi if pass_index == 0 else self.end_lo)()

    def bits(self, i: int) -> int:
        return self._bits[i]

    def value(self, i: int) -> float:
        return _float_of_bits(self._bits[i])

    def ties_in_top(self, i: int) -> int:
        """How many of the values equal to the i-th wanted one belong to the top ``ranks[i]``."""
        return self.ranks[i] - self._above[i]

    def ties(self, i: int) -> int:
        """How many values equal the i-th wanted one."""
        return self._equal[i]


class ExactTop:
    """Mask of exactly the k largest |x| of a tensor seen in row chunks (k = ``stats.ranks[i]``).

    Values above the k-th largest are kept; of those equal to it, the last ones in row-major order
    are kept until the count is k: ties rank as a stable sort by magnitude ranks them (later = larger),
    which is what mergekit's sort does on small tensors. Chunks must be masked in order of their flat
    ``start`` the first time (the executor and merge_tensors do so); they may be masked again later.
    """

    def __init__(self, stats: OrderStatistics, i: int):
        self.bits = stats.bits(i)
        self.skip = stats.ties(i) - stats.ties_in_top(i)  # the earliest tied values left out
        self._ties_before = {0: 0}  # chunk start -> ties at the threshold in earlier chunks

    def mask(self, x: torch.Tensor, start: int) -> torch.Tensor:
        bits = magnitude_bits(x).reshape(-1)
        keep = bits > self.bits
        tie = bits == self.bits
        before = self._ties_before.get(start)
        if before is None:
            raise RuntimeError(f"chunk at element {start} masked before the chunks ahead of it")
        count = int(tie.sum())
        self._ties_before.setdefault(start + bits.numel(), before + count)
        if count and before + count > self.skip:
            if before < self.skip:
                tie &= torch.cumsum(tie, 0) > self.skip - before
            keep |= tie
        return keep.reshape(x.shape)


def _float_of_bits(bits: int) -> float:
    # struct, not torch: the native backend calls this, and must not import torch (a quarter GiB of RSS
    # that its memory budget does not count)
    return struct.unpack("<f", struct.pack("<i", bits))[0]


def band_counts(density: float, gamma: float, numel: int) -> tuple[int, int]:
    """(dropped_top, kept) for a magnitude band (Model Breadcrumbs).

    kept = keep_count(density, n); dropped_top = int(gamma * n), lowered so that kept + dropped_top <= n
    (mergekit's rule: with gamma >= 1 - density no small entries are dropped). The rest, the smallest
    n - kept - dropped_top entries, are dropped too.
    """
    kept = keep_count(density, numel)
    top = int(gamma * numel) if gamma > 0 else 0
    return min(top, numel - kept), kept


class MagnitudeBand:
    """Keeps exactly the entries ranked ``dropped_top + 1 .. dropped_top + kept`` by |x| (1 = largest).

    Two order statistics from the same passes give the band's edges; entries tied at an edge are
    ranked by position (ExactTop: the later, the larger), so the count is exact even with repeated
    magnitudes.
    """

    def __init__(self, numel: int, dropped_top: int, kept: int):
        self.numel, self.dropped_top, self.kept = numel, dropped_top, kept
        ranks = []
        if self.trivial is None:
            if dropped_top > 0:
                ranks.append(dropped_top)
            if dropped_top + kept < numel:
                ranks.append(dropped_top + kept)
        self.stats = OrderStatistics(ranks)
        self.passes = 2 if ranks else 0
        self._upper: ExactTop | None = None
        self._lower: ExactTop | None = None

    @property
    def trivial(self) -> bool | None:
        """True when everything is kept, False when nothing is, None when thresholds are needed."""
        if self.kept <= 0:
            return False
        if self.kept >= self.numel:
            return True
        return None

    def observe(self, pass_index: int, x: torch.Tensor) -> None:
        self.stats.observe(pass_index, x)

    def end(self, pass_index: int) -> None:
        self.stats.end(pass_index)
        if pass_index == 1:
            i = 0
            if self.dropped_top > 0:
                self._upper, i = ExactTop(self.stats, 0), 1
            if self.dropped_top + self.kept < self.numel:
                self._lower = ExactTop(self.stats, i)

    def mask(self, x: torch.Tensor, start: int) -> torch.Tensor:
        """True where x (the chunk at flat offset ``start``) is kept."""
        if self.trivial is not None:
            return torch.full_like(x, self.trivial, dtype=torch.bool)
        keep = self._lower.mask(x, start) if self._lower else torch.ones_like(x, dtype=torch.bool)
        if self._upper is not None:
            keep &= ~self._upper.mask(x, start)
        return keep


def rank_keep_probability(x: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """DELLA's MagPrune keep probabilities, per row (the last dimension; a 1-D tensor is one row).

    Entries of a row of n are ranked by |x| (0 = smallest; ties in index order) and kept with
    probability p = density - epsilon + 2 * epsilon * rank / (n - 1): density - epsilon for the smallest
    and density + epsilon for the largest. A row of one entry gets p = density.
    """
    n = x.shape[-1] if x.dim() > 0 else 1
    if n == 1 or epsilon == 0:
        return torch.full_like(x, density)
    rows = x.reshape(-1, n)
    order = rows.abs().argsort(dim=-1, stable=True)
    ranks = torch.empty_like(order)
    ranks.scatter_(-1, order, torch.arange(n, device=x.device).expand_as(order))
    del order
    p = ranks.to(x.dtype).mul_(2.0 * epsilon / (n - 1)).add_(density - epsilon)
    return p.reshape(x.shape)
