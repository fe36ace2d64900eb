"""Reproducible randomness: keep masks addressed by (seed, tensor name, model index, element index).

Element ``j`` of a tensor gets the 32-bit number ``h(j)``, a hash of its index under a key derived from
(seed, tensor name, model index): two rounds of a 32-bit integer hash with good avalanche (Wellons'
"lowbias32"), over the low and the high half of ``j``. A draw depends on nothing but its address, so a
mask is the same however the tensor is chunked, in whatever order tensors run, on however many threads,
and on any device (the numbers are made on the CPU). The loops are compiled by numba and vectorise: the
stream costs less than reading the mask's tensor.

``probability`` p is taken as T / 2**32 with T = round(p * 2**32), and element j is kept when
h(j) < T: P(keep) is T / 2**32 exactly.
"""

from __future__ import annotations

import hashlib

import numpy as np

from mergesmith.core._torch import torch
from mergesmith.core.loops import keep_const, keep_each, mask_const


def derive_seed(*parts: object) -> int:
    digest = hashlib.sha256("\x1f".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def threshold_of(probability: float) -> int:
    """T = round(p * 2**32), p clamped to [0, 1]."""
    return round(min(max(float(probability), 0.0), 1.0) * 2.0**32)


class RandomStream:
    """Random keep masks for the flat element range of one (tensor, model) pair."""

    def __init__(self, seed: int, tensor_name: str, model_index: int):
        key = derive_seed(seed, tensor_name, model_index)
        self.k0 = np.uint32(key & 0xFFFFFFFF)
        self.k1 = np.uint32((key >> 32) & 0xFFFFFFFF)

    def keep(self, start: int, count: int, probability: float | torch.Tensor) -> torch.Tensor:
        """keep_array as a torch tensor; ``probability`` may be a tensor of one value per element."""
        if not isinstance(probability, float | int):
            probability = probability.detach().reshape(-1).cpu().double().numpy()
        return torch.from_numpy(self.keep_array(start, count, probability))

    def keep_array(self, start: int, count: int, probability: float | np.ndarray) -> np.ndarray:
        """A Bernoulli boolean mask (numpy) for elements [start, start + count).

        ``probability`` is one number, or one per element (an array of ``count`` values).
        """
        out = np.empty(count, dtype=np.bool_)
        if isinstance(probability, np.ndarray):
            scaled = np.round(np.clip(probability.astype(np.float64).reshape(-1), 0.0, 1.0) * 2.0**32)
            thresholds = scaled.astype(np.uint64)
            if len(thresholds) != count:
                raise ValueError(f"{len(thresholds)} probabilities for {count} elements")
            keep_each(np.uint64(start), self.k0, self.k1, thresholds, out)
            return out
        keep_const(np.uint64(start), self.k0, self.k1, np.uint64(threshold_of(probability)), out)
        return out

    def mask(self, x: np.ndarray, start: int, probability: float) -> np.ndarray:
        """x * keep_array(start, x.size, probability) for a contiguous float32 array, in place."""
        mask_const(np.uint64(start), self.k0, self.k1, np.uint64(threshold_of(probability)), x.reshape(-1))
        return x
