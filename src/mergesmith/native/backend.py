"""The native backend's arrays: inputs read into numpy, converted to float32, outputs rounded back."""

from __future__ import annotations

import threading
from contextlib import contextmanager

import numpy as np

from mergesmith import kernels
from mergesmith.execute import Span
from mergesmith.native.convert import from_float32, round_to, to_float32
from mergesmith.plan import MergePlan, OutputTensor, TensorSource


class NativeBackend:
    """float32 numpy arrays; the kernels are the methods' own (``Method.native``)."""

    def __init__(self, plan: MergePlan):
        self.plan = plan

    def read(self, t: OutputTensor, src: TensorSource, span: Span, raw: bool) -> np.ndarray:
        model = self.plan.models[src.model]
        code = model.tensors[src.tensor].code
        stored = model.read_array(src.tensor, span)
        if raw and code in ("BF16", "F32") and t.cast_code in (None, code):
            return stored  # the kernel converts as it reads (mergesmith.kernels); uint16 holds bfloat16
        x = to_float32(stored, code)
        if t.cast_code is not None and t.cast_code != code:
            x = round_to(x, t.cast_code)
        return x

    def read_copy(self, t: OutputTensor, span: Span) -> np.ndarray:
        src = t.inputs[0]
        return self.plan.models[src.model].read_array(src.tensor, span)

    def finish(self, t: OutputTensor, out: np.ndarray) -> tuple[np.ndarray, bool]:
        return from_float32(out, t.out_code)

    def chunk_dtype(self, t: OutputTensor) -> str:
        return t.compute_code

    @contextmanager
    def threads(self):
        """While the merge runs: numba's one-time set-up on a thread of its own, overlapping the workers'
        first reads (they wait for it at their first compiled call)."""
        warm = threading.Thread(target=kernels.warm_up, name="mergesmith-warm-up", daemon=True)
        warm.start()
        try:
            yield
        finally:
            warm.join()
