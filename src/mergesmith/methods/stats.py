"""Whole-tensor statistics gathered over row chunks, for methods whose coefficients depend on them."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from mergesmith.core._torch import torch
from mergesmith.core.loops import row_abs_sums
from mergesmith.methods import arrays

SUM_BLOCK = 1 << 20  # elements per block of a float64 reduction, to bound scratch memory


class GramAccumulator:
    """G[i, j] = <v_i, v_j> over the flattened tensors, summed in float64 over chunks and blocks."""

    def __init__(self, n: int):
        self.gram = torch.zeros(n, n, dtype=torch.float64)

    def observe(self, vectors: Sequence[torch.Tensor]) -> None:
        flat = [v.reshape(-1) for v in vectors]
        for start in range(0, flat[0].numel(), SUM_BLOCK):
            block = torch.stack([f[start : start + SUM_BLOCK] for f in flat]).double()
            self.gram += (block @ block.T).cpu()


def row_gram(vectors: Sequence[torch.Tensor]) -> torch.Tensor:
    """G[..., i, j] = <v_i[..., :], v_j[..., :]> per row (the last dimension), summed in float64."""
    n = len(vectors)
    gram = torch.empty(*vectors[0].shape[:-1], n, n, dtype=torch.float64, device=vectors[0].device)
    for i in range(n):
        for j in range(i, n):
            dot = (vectors[i] * vectors[j]).sum(-1, dtype=torch.float64)
            gram[..., i, j] = dot
            gram[..., j, i] = dot
    return gram


def unit_gram(gram: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(norms, cosines) from a Gram matrix; a zero vector has cosine 0 with everything."""
    norms = gram.diagonal(dim1=-2, dim2=-1).clamp_min(0).sqrt()
    safe = torch.where(norms > 0, norms, torch.ones_like(norms))
    cos = gram / (safe.unsqueeze(-1) * safe.unsqueeze(-2))
    return norms, cos.clamp(-1.0, 1.0)


class RowL1:
    """sum |x| over a tensor seen whole or in row chunks, the same to the last bit either way.

    Each row's L1 norm is summed in float64 (CPU data: ``row_abs_sums``, compiled, in a fixed order; so
    both backends get the same bits); rows are never split between chunks, and the row sums are added
    exactly (math.fsum), so the grouping into chunks cannot change the result.
    """

    def __init__(self) -> None:
        self._rows: list[np.ndarray] = []
        self._value: float | None = None

    def add(self, x) -> None:
        """Add the rows of ``x`` (a torch tensor or numpy array)."""
        xn = arrays.host_numpy(x)
        if xn is not None:
            n_rows, row_len = arrays.rows(xn)
            sums = np.empty(n_rows, dtype=np.float64)
            row_abs_sums(xn.reshape(-1), row_len, sums)
            self.add_rows(sums)
            return
        rows = x.reshape(x.shape[0], -1) if x.dim() >= 2 else x.reshape(1, -1)
        self.add_rows(rows.abs().sum(dim=1, dtype=torch.float64).cpu().numpy())

    def add_rows(self, sums: np.ndarray) -> None:
        """Add rows whose L1 norms are already summed (``row_abs_sums``)."""
        self._rows.append(sums)
        self._value = None

    @property
    def value(self) -> float:
        """The exact sum of the rows' norms, rounded once (computed once per change: the kernels ask
        for it for every chunk)."""
        if self._value is None:
            self._value = math.fsum(np.concatenate(self._rows)) if self._rows else 0.0
        return self._value
