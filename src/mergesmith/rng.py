"""Reproducible randomness: keep masks addressed by (seed, tensor name, model index, element index).

Random bits come in fixed blocks of ``min(BLOCK, numel)`` elements, each from a generator seeded by a hash
of (seed, tensor name, model index, block number). Element ``j`` of a tensor therefore always gets the
same draw, however the tensor is chunked, in whatever order tensors run, on however many threads, and on
any device (the bits are drawn on the CPU, by numpy's PCG64, read little-endian).
"""

from __future__ import annotations

import hashlib

import numpy as np

from mergesmith._torch import torch

BLOCK = 1 << 20


def derive_seed(*parts: object) -> int:
    digest = hashlib.sha256("\x1f".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


class RandomStream:
    """Random keep masks for the flat element range of one (tensor, model) pair."""

    def __init__(self, seed: int, tensor_name: str, model_index: int, numel: int):
        self.key = (seed, tensor_name, model_index)
        self.block = max(1, min(BLOCK, numel))

    def _generator(self, b: int) -> np.random.Generator:
        # numpy's PCG64 has a bit stream that is stable across platforms and releases, and its draws are
        # faster than torch.rand's on the CPU
        return np.random.Generator(np.random.PCG64(derive_seed(*self.key, b)))

    def _bits16(self, b: int) -> np.ndarray:
        """16 random bits per element of block ``b``: each raw 64-bit output cut in four."""
        raw = self._generator(b).bit_generator.random_raw((self.block + 3) // 4).astype("<u8", copy=False)
        return raw.view("<u2")[: self.block]

    def _tie_bits16(self, b: int, index: np.ndarray) -> np.ndarray:
        """Another 16 independent bits for the elements ``index`` of block ``b`` (a splitmix64 hash)."""
        z = index.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15) + np.uint64(
            derive_seed(*self.key, b, "tie")
        )
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return ((z ^ (z >> np.uint64(31))) >> np.uint64(48)).astype(np.uint16)

    def keep(self, start: int, count: int, probability: float | torch.Tensor) -> torch.Tensor:
        """keep_array as a torch tensor; ``probability`` may be a tensor of one value per element."""
        if not isinstance(probability, float | int):
            probability = probability.detach().reshape(-1).cpu().double().numpy()
        return torch.from_numpy(self.keep_array(start, count, probability))

    def keep_array(self, start: int, count: int, probability: float | np.ndarray) -> np.ndarray:
        """A Bernoulli boolean mask (numpy) for elements [start, start + count).

        ``probability`` is one number, or one per element (an array of ``count`` values). It is taken as
        T / 2**32 with T = round(probability * 2**32) (exact to 2**-33), and element j is kept when a
        32-bit random number is below T. Its high 16 bits come from the block's PCG64 stream (four
        elements per raw draw: the generator is most of the cost); only where they equal T's high 16
        bits (one element in 65536) do the low 16 bits matter, and those come from a hash of the
        element's index.
        """
        if isinstance(probability, np.ndarray):
            scaled = np.round(np.clip(probability.astype(np.float64).reshape(-1), 0.0, 1.0) * 2.0**32)
            threshold = scaled.astype(np.uint64)
            if len(threshold) != count:
                raise ValueError(f"{len(threshold)} probabilities for {count} elements")
        else:
            threshold = round(min(max(probability, 0.0), 1.0) * 2.0**32)
            if threshold >= 1 << 32:
                return np.ones(count, dtype=np.bool_)
        every = isinstance(threshold, np.ndarray)
        t_hi = threshold >> 16
        t_lo = threshold & 0xFFFF
        if every:  # T = 2**32 (probability 1) has t_hi 65536: above any 16-bit draw, so always kept
            t_hi = t_hi.astype(np.uint32)
            t_lo = t_lo.astype(np.uint16)
        out = np.empty(count, dtype=np.bool_)
        pos = start
        while pos < start + count:
            b, off = divmod(pos, self.block)
            n = min(self.block - off, start + count - pos)
            window = slice(pos - start, pos - start + n)
            hi_t = t_hi[window] if every else t_hi
            hi = self._bits16(b)[off : off + n]
            part = out[window]
            np.less(hi, hi_t, out=part)
            if every or t_lo:
                ties = np.flatnonzero(hi == hi_t)
                bound = t_lo[window][ties] if every else t_lo
                part[ties] = self._tie_bits16(b, ties + off) < bound
            pos += n
        return out
