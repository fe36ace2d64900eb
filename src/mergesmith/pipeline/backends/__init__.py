"""Backends: where a merge's maths runs. Both read a tensor's inputs as arrays (which the method's kernel
computes on) and finish its output in the output dtype, behind one interface (:class:`Backend`):

- ``torch.py``: torch tensors on ``--device``; runs every method.
- ``native.py``: numpy arrays with numba-compiled loops (``core/loops.py``), no torch import; runs the
  methods with ``Method.native`` on CPU merges of plain safetensors models, with the same bytes.

``choose_backend`` picks one (``--backend auto``: native when it can run the merge), ``make_backend``
builds it.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any, Protocol

from mergesmith.core.errors import MergeError

if TYPE_CHECKING:
    from mergesmith.pipeline.plan import MergePlan, OutputTensor, TensorSource

BACKENDS = ("auto", "native", "torch")

Span = tuple[int, int] | None  # rows [r0, r1) of an output tensor, or None for a 0-d tensor


class Backend(Protocol):
    """Where the maths runs: reads inputs as arrays (which the method's kernel computes on), finishes
    outputs."""

    def read(self, t: OutputTensor, src: TensorSource, span: Span, raw: bool) -> Any:
        """One input's rows, in the compute dtype (or its stored float dtype when ``raw``)."""
        ...

    def read_copy(self, t: OutputTensor, span: Span) -> Any:
        """The rows of a verbatim copy (``t.copy``), as stored."""
        ...

    def finish(self, t: OutputTensor, out: Any) -> tuple[Any, bool]:
        """The output chunk in the output dtype, and whether all its values are finite."""
        ...

    def chunk_dtype(self, t: OutputTensor) -> Any: ...

    def threads(self) -> AbstractContextManager: ...


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
