"""The interface every backend implements (:class:`Backend`) and the row span it reads and writes."""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from mergesmith.pipeline.plan import OutputTensor, TensorSource

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
