"""Reproducible randomness: uniform draws addressed by (seed, tensor name, model index, element index).

Draws come in fixed blocks of ``min(BLOCK, numel)`` elements, each from a generator seeded by a hash of
(seed, tensor name, model index, block number). Element ``j`` of a tensor therefore always gets the same
number, however the tensor is chunked, in whatever order tensors run, on however many threads, and on
any device (the numbers are drawn on the CPU, by numpy's PCG64).
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch

BLOCK = 1 << 20


def derive_seed(*parts: object) -> int:
    digest = hashlib.sha256("\x1f".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


class RandomStream:
    """Uniform [0, 1) float32 numbers for the flat element range of one (tensor, model) pair."""

    def __init__(self, seed: int, tensor_name: str, model_index: int, numel: int):
        self.key = (seed, tensor_name, model_index)
        self.block = max(1, min(BLOCK, numel))

    def _generator(self, b: int) -> np.random.Generator:
        # numpy's PCG64 has a bit stream that is stable across platforms and releases, and its draws are
        # faster than torch.rand's on the CPU
        return np.random.Generator(np.random.PCG64(derive_seed(*self.key, b)))

    def _block(self, b: int) -> torch.Tensor:
        return torch.from_numpy(self._generator(b).random(self.block, dtype=np.float32))

    def _bits(self, b: int) -> np.ndarray:
        """32 random bits per element of block ``b``: the raw 64-bit outputs, each cut in two."""
        raw = self._generator(b).bit_generator.random_raw((self.block + 1) // 2)
        return raw.view(np.uint32)[: self.block]

    def keep(self, start: int, count: int, probability: float) -> torch.Tensor:
        """A Bernoulli(``probability``) boolean mask for elements [start, start + count).

        Element j is kept when its 32 random bits, read as an integer, are below
        round(probability * 2**32): the probability is exact to 2**-33, and an integer compare on raw
        bits costs less than half of drawing floats. (Another stream than :meth:`uniform`'s.)
        """
        threshold = round(probability * 2.0**32)
        if threshold >= 1 << 32:
            return torch.ones(count, dtype=torch.bool)
        out = np.empty(count, dtype=np.bool_)
        pos = start
        while pos < start + count:
            b, off = divmod(pos, self.block)
            n = min(self.block - off, start + count - pos)
            np.less(self._bits(b)[off : off + n], threshold, out=out[pos - start : pos - start + n])
            pos += n
        return torch.from_numpy(out)

    def uniform(self, start: int, count: int) -> torch.Tensor:
        """Numbers for elements [start, start + count)."""
        out = torch.empty(count, dtype=torch.float32)
        pos = start
        while pos < start + count:
            b, off = divmod(pos, self.block)
            n = min(self.block - off, start + count - pos)
            out[pos - start : pos - start + n] = self._block(b)[off : off + n]
            pos += n
        return out
