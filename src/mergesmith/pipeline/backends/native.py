"""The native backend: merges run on numpy arrays, with numba-compiled loops (loops.py), and never
import torch (about a second of every run). It runs the methods whose kernels do their work through
``methods.arrays`` (``Method.native``) on CPU merges of plain safetensors models in bfloat16, float16
and float32, and gives the same bytes as the torch backend. ``backend_problem`` says why a merge cannot
use it; the executor then uses torch.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import TYPE_CHECKING

import numpy as np

from mergesmith.core import loops
from mergesmith.core.model import ModelSource
from mergesmith.methods import get_method
from mergesmith.pipeline.backends.base import Span
from mergesmith.pipeline.backends.convert import from_float32, round_to, to_float32

if TYPE_CHECKING:
    from mergesmith.pipeline.plan import MergePlan, OutputTensor, TensorSource

NATIVE_CODES = frozenset({"BF16", "F16", "F32"})


def backend_problem(plan: MergePlan, device: str, transformed_output: bool) -> str | None:
    """Why the native backend cannot run this merge, or None when it can."""
    if device != "cpu":
        return f"it runs on the CPU only (--device {device})"
    if transformed_output:
        return "the output format transforms the merged tensors (--out-format)"
    for ref, model in plan.models.items():
        if type(model) is not ModelSource:
            return f"model {ref!r} is not a plain safetensors model (LoRA adapter, packed BitNet weights, or rows re-indexed to another tokenizer)"
    for t in plan.tensors:
        if t.copy:
            continue
        if not get_method(t.method).native:
            return f"merge_method {t.method!r} has no native kernel"
        if t.compute_code != "F32":
            return f"tensor {t.name!r} is computed in {t.compute_code} (float64 inputs or dtype)"
        codes = {t.out_code, t.cast_code or t.out_code} | {
            plan.models[s.model].tensors[s.tensor].code for s in t.sources
        }
        if not codes <= NATIVE_CODES:
            return f"tensor {t.name!r} has a dtype other than bfloat16, float16 and float32"
    return None


class NativeBackend:
    """float32 numpy arrays; the kernels are the methods' own (``Method.native``)."""

    def __init__(self, plan: MergePlan):
        self.plan = plan

    def read(self, t: OutputTensor, src: TensorSource, span: Span, raw: bool) -> np.ndarray:
        model = self.plan.models[src.model]
        code = model.tensors[src.tensor].code
        stored = model.read_array(src.tensor, span)
        if raw and code in ("BF16", "F32") and t.cast_code in (None, code):
            return stored  # the kernel converts as it reads (mergesmith.core.loops); uint16 holds bfloat16
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
        warm = threading.Thread(target=loops.warm_up, name="mergesmith-warm-up", daemon=True)
        warm.start()
        try:
            yield
        finally:
            warm.join()
