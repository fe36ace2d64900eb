"""Torch's intra-op threads for small models: one is faster.

A model whose largest matrix is small gains nothing from splitting a matmul between threads, which then
only synchronise: on a busy 2-core machine two threads made each `bitnet --heal` step and each
evaluation batch of the shipped skill models 4-10x slower than one, with the same results
(docs/bitnet.md, docs/skills.md).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

#: Below this many elements in its largest matrix a model is "small" and runs on one torch thread.
SMALL_MATRIX = 1 << 20


@contextlib.contextmanager
def threads_for(model: Any) -> Iterator[None]:
    """Run the block with one torch thread when ``model`` (an nn.Module) is small, else as is."""
    import torch

    largest = max((p.numel() for p in model.parameters() if p.dim() == 2), default=0)
    before = torch.get_num_threads()
    if largest < SMALL_MATRIX:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
