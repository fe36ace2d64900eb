"""The native backend: merges run on numpy arrays, with numba-compiled loops (kernels.py), and never
import torch (about a second of every run). It runs the methods whose kernels do their work through
``methods.arrays`` (``Method.native``) on CPU merges of plain safetensors models in bfloat16, float16
and float32, and gives the same bytes as the torch backend. ``backend_problem`` says why a merge cannot
use it; the executor then uses torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from mergesmith.methods import get_method
from mergesmith.model import ModelSource

if TYPE_CHECKING:
    from mergesmith.plan import MergePlan

NATIVE_CODES = frozenset({"BF16", "F16", "F32"})
BACKENDS = ("auto", "native", "torch")


def backend_problem(plan: MergePlan, device: str, transformed_output: bool) -> str | None:
    """Why the native backend cannot run this merge, or None when it can."""
    if device != "cpu":
        return f"it runs on the CPU only (--device {device})"
    if transformed_output:
        return "the output format transforms the merged tensors (--out-format)"
    for ref, model in plan.models.items():
        if type(model) is not ModelSource:
            return f"model {ref!r} is not a plain safetensors model (LoRA adapter or packed BitNet weights)"
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
