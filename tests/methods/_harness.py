"""Run a method's kernel the way the executor does: over row chunks, with its statistic passes."""

from __future__ import annotations

from typing import Any

import torch

from mergesmith.core.rng import RandomStream
from mergesmith.methods import Chunk, fill_defaults, get_method, merge_tensors


def run_chunked(
    method: str,
    models: list[torch.Tensor],
    base: torch.Tensor | None = None,
    *,
    rows: int,
    seed: int = 0,
    name: str = "tensor",
    **params: Any,
) -> torch.Tensor:
    """Merge with chunks of ``rows`` rows; equals merge_tensors(...) for a chunkable method."""
    m = get_method(method)
    resolved = fill_defaults(m, params, len(models))
    m.kernel.check_params(resolved)
    numel = models[0].numel()
    row_elems = numel // models[0].shape[0]
    kernel = m.kernel(resolved, numel)
    rng = [RandomStream(seed, name, i) for i in range(len(models))] if m.random else None

    def load(r: int) -> Chunk:
        sl = slice(r, r + rows)
        b = base[sl].float().clone() if base is not None else None
        return Chunk(b, [x[sl].float().clone() for x in models], r * row_elems, rng)

    starts = range(0, models[0].shape[0], rows)
    kernel.observe_all(lambda: (load(r) for r in starts))
    return torch.cat([kernel.apply(load(r)) for r in starts])


def assert_chunk_invariant(method: str, models, base=None, rows: int = 3, atol: float = 1e-6, **params):
    whole = merge_tensors(method, models, base=base, **params)
    chunked = run_chunked(method, models, base, rows=rows, **params)
    torch.testing.assert_close(chunked, whole, atol=atol, rtol=1e-5)
