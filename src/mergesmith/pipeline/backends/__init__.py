"""Backends: where a merge's maths runs. Both read a tensor's inputs as arrays (which the method's kernel
computes on) and finish its output in the output dtype, behind one interface (:class:`Backend`, in
``base.py``):

- ``torch.py``: torch tensors on ``--device``; runs every method.
- ``native.py``: numpy arrays with numba-compiled loops (``core/loops.py``), no torch import; runs the
  methods with ``Method.native`` on CPU merges of plain safetensors models, with the same bytes.

``choose_backend`` picks one (``--backend auto``: native when it can run the merge), ``make_backend``
builds it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from mergesmith.core.errors import MergeError
from mergesmith.pipeline.backends.base import Backend, Span

if TYPE_CHECKING:
    from mergesmith.pipeline.plan import MergePlan

__all__ = ["BACKENDS", "Backend", "Span", "choose_backend", "make_backend"]

BACKENDS = ("auto", "native", "torch")


def choose_backend(
    plan: MergePlan, backend: str, device: str, transformed_output: bool
) -> tuple[str, str | None]:
    """("native" or "torch", why not native when torch). ``--backend native`` on a merge it cannot run
    is an error."""
    from mergesmith.pipeline.backends.native import backend_problem

    if backend == "torch":
        return "torch", "--backend torch"
    problem = backend_problem(plan, device, transformed_output)
    if problem is None:
        return "native", None
    if backend == "native":
        raise MergeError(f"--backend native cannot run this merge: {problem}")
    return "torch", problem


def make_backend(name: str, plan: MergePlan, device: str) -> Backend:
    """The backend ``name`` ("native" or "torch"; the torch one imports torch)."""
    if name == "native":
        from mergesmith.pipeline.backends.native import NativeBackend

        return NativeBackend(plan)
    from mergesmith.pipeline.backends.torch import TorchBackend

    return TorchBackend(plan, device)
