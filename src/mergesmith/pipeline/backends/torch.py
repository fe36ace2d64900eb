"""The torch backend: torch tensors on ``--device`` (CPU or CUDA); runs every method."""

from __future__ import annotations

import math
from contextlib import contextmanager

from mergesmith.core import dtypes
from mergesmith.core._torch import torch
from mergesmith.core.errors import MergeError
from mergesmith.pipeline.backends.base import Span
from mergesmith.pipeline.plan import MergePlan, OutputTensor, TensorSource


class TorchBackend:
    """torch tensors on ``device``; runs every method."""

    def __init__(self, plan: MergePlan, device: str):
        self.plan = plan
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise MergeError("--device cuda was given but no CUDA GPU is available to torch")

    def read(self, t: OutputTensor, src: TensorSource, span: Span, raw: bool):
        x = self.plan.models[src.model].read(src.tensor, span)
        if t.cast_code is not None and x.dtype != t.cast_dtype:
            x = x.to(t.cast_dtype)
        if raw and x.is_floating_point() and x.dtype.itemsize <= dtypes.itemsize(t.compute_code):
            return x.to(self.device)  # the kernel converts as it computes
        return x.to(self.device, t.compute_dtype)  # read() returned a buffer we own: in-place is safe

    def read_copy(self, t: OutputTensor, span: Span):
        src = t.inputs[0]
        return self.plan.models[src.model].read(src.tensor, span)

    def finish(self, t: OutputTensor, out):
        out = out.to(t.out_dtype)
        return out, _all_finite(out)

    def chunk_dtype(self, t: OutputTensor):
        return t.compute_dtype

    @contextmanager
    def threads(self):
        threads = torch.get_num_threads()
        # one torch thread per worker: the workers are the parallelism, and intra-op threads on a busy
        # machine mostly wait for each other
        torch.set_num_threads(1 if self.device.type == "cpu" else threads)
        try:
            yield
        finally:
            torch.set_num_threads(threads)


def _all_finite(x: torch.Tensor) -> bool:
    # a sum is NaN or Inf if any element is; only then (or on overflow of the sum) look closer
    if math.isfinite(float(x.sum(dtype=torch.float64 if x.dtype == torch.float64 else torch.float32))):
        return True
    return bool(torch.isfinite(x).all())
