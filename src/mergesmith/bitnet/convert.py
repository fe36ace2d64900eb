"""Tensor-by-tensor drivers: plan an export from tensor headers, then convert one tensor at a time.

A *source* is anything with ``config`` (dict), ``tensors`` (name -> entry with ``dtype`` and
``shape``) and ``read(name)``: :class:`mergesmith.core.model.ModelSource` (a folder on disk, read tensor
by tensor), :class:`mergesmith.core.bitnet.source.BitnetModelSource` (a packed transformers BitNet
checkpoint seen as float weights ``gamma * W~``, which ``ModelSource.open`` returns for such a
folder), or :class:`DictSource` (an in-memory state dict: tests and ``--heal``).

Each export is planned first (which tensors, with which output names, dtypes and shapes), from the
headers alone, so that a writer can lay out its files before any tensor is converted.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from mergesmith.core.bitnet.constants import DEFAULT_LINEAR_CLASS
from mergesmith.core.bitnet.hf import export_config, export_linear, linear_module_names, plan_hf
from mergesmith.core.bitnet.pack import packed_rows
from mergesmith.core.bitnet.quant import TensorSelector, ternary_of
from mergesmith.core.bitnet.source import PackedTensorInfo
from mergesmith.core.dtypes import code_of
from mergesmith.core.errors import MergeError
from mergesmith.core.write import TensorSpec


class TensorEntry(Protocol):
    """What a source says about one tensor before reading it (a TensorInfo or TensorSpec)."""

    @property
    def code(self) -> str: ...  # safetensors dtype code

    @property
    def dtype(self) -> torch.dtype: ...  # the same, for torch

    @property
    def shape(self) -> tuple[int, ...]: ...


class TensorSource(Protocol):
    """A model read tensor by tensor (see the module docstring)."""

    @property
    def config(self) -> dict[str, Any]: ...

    @property
    def tensors(self) -> Mapping[str, TensorEntry]: ...

    def read(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor: ...


class DictSource:
    """An in-memory source (a state dict and a config dict)."""

    def __init__(self, state_dict: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> None:
        self._sd = dict(state_dict)
        self.config = dict(config)

    @property
    def tensors(self) -> dict[str, TensorSpec]:
        return {k: TensorSpec(k, code_of(v.dtype), tuple(v.shape)) for k, v in self._sd.items()}

    def read(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        t = self._sd[name]
        return t if rows is None else t[rows[0] : rows[1]]


def _finite(name: str, tensor: torch.Tensor) -> torch.Tensor:
    """``tensor``, refused if it holds NaN or Inf: its absmean scale would be NaN, and so would every
    output of the exported model."""
    if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
        raise MergeError(f"tensor {name!r} of MODEL holds NaN or Inf; nothing was written")
    return tensor


@dataclass
class LayerStat:
    """What happened to one ternarised weight."""

    name: str
    shape: tuple[int, ...]
    zero_fraction: float
    already_ternary: bool
    gamma: float


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def scale_dtype(entry: TensorEntry) -> torch.dtype:
    """dtype of the ``weight_scale`` written for a weight: the model dtype, i.e. the weight's own float
    dtype, or for a packed input the dtype its ``weight_scale`` was stored in."""
    if isinstance(entry, PackedTensorInfo):
        return entry.scale.dtype
    return entry.dtype if entry.dtype.is_floating_point else torch.float32


# --- transformers export -------------------------------------------------------------------------


@dataclass
class HfPlan:
    """The transformers export of one source, decided from headers: output config, the modules that
    become ternary, those kept in high precision (and why), and every output tensor in write order."""

    config: dict[str, Any]
    ternary: set[str]
    kept: dict[str, str]
    specs: list[TensorSpec]
    linear_class: str


def plan_hf_export(
    source: TensorSource, selector: TensorSelector, linear_class: str = DEFAULT_LINEAR_CLASS
) -> HfPlan:
    """Plan the transformers export of ``source`` (no tensor data is read).

    A ternarised module ``m`` (``out x in`` weight) is written as ``m.weight`` uint8
    ``(ceil(out/4), in)``, ``m.weight_scale`` ``(1,)`` in the model dtype and its bias, if any.
    """
    try:
        linear = linear_module_names(source.config)
    except ValueError as exc:
        raise MergeError(str(exc)) from exc
    entries = source.tensors
    plan = plan_hf({n: e.shape for n, e in entries.items()}, linear, selector)
    config = export_config(source.config, plan.modules_to_not_convert, linear_class)
    ternary = set(plan.ternary)
    specs: list[TensorSpec] = []
    for name, entry in entries.items():
        module, _, leaf = name.rpartition(".")
        if module in ternary and leaf == "bias":
            continue  # written with its weight
        if module not in ternary or leaf != "weight":
            specs.append(TensorSpec(name, entry.code, tuple(entry.shape)))
            continue
        rows, cols = entry.shape
        specs.append(TensorSpec(name, "U8", (packed_rows(rows), cols)))
        specs.append(TensorSpec(f"{module}.weight_scale", code_of(scale_dtype(entry)), (1,)))
        bias = entries.get(f"{module}.bias")
        if bias is not None:
            specs.append(TensorSpec(f"{module}.bias", bias.code, tuple(bias.shape)))
    return HfPlan(config, ternary, plan.kept, specs, linear_class)


def iter_hf_tensors(
    source: TensorSource, plan: HfPlan
) -> Iterator[tuple[dict[str, torch.Tensor], LayerStat | None, int]]:
    """Yield ``(output tensors, stat or None, input bytes)`` one input tensor (or one weight+bias
    pair) at a time, in the order of ``plan.specs``; only that tensor is in memory."""
    entries = source.tensors
    for name, entry in entries.items():
        module, _, leaf = name.rpartition(".")
        if module in plan.ternary and leaf == "bias":
            continue
        tensor = _finite(name, source.read(name))
        if module not in plan.ternary or leaf != "weight":
            yield {name: tensor}, None, _nbytes(tensor)
            continue
        bias_name = f"{module}.bias"
        bias = source.read(bias_name) if bias_name in entries else None
        ternary, was = ternary_of(tensor)
        out = export_linear(module, ternary, bias, plan.linear_class, scale_dtype(entry))
        stat = LayerStat(name, tuple(entry.shape), ternary.zero_fraction(), was, float(ternary.scale))
        yield out, stat, _nbytes(tensor) + (_nbytes(bias) if bias is not None else 0)


@dataclass
class HfExport:
    """Result of :func:`export_hf`: converted tensors in output order, the new config, statistics."""

    tensors: dict[str, torch.Tensor]
    config: dict[str, Any]
    stats: list[LayerStat]
    kept: dict[str, str]
    bytes_in: int
    bytes_out: int


def export_hf(
    source: TensorSource, selector: TensorSelector | None = None, linear_class: str = DEFAULT_LINEAR_CLASS
) -> HfExport:
    """Convert a whole source in memory (the command streams the same tensors to disk instead)."""
    plan = plan_hf_export(source, selector or TensorSelector(), linear_class)
    tensors: dict[str, torch.Tensor] = {}
    stats: list[LayerStat] = []
    bytes_in = 0
    for out, stat, nbytes in iter_hf_tensors(source, plan):
        tensors.update(out)
        bytes_in += nbytes
        if stat is not None:
            stats.append(stat)
    bytes_out = sum(_nbytes(t) for t in tensors.values())
    return HfExport(tensors, plan.config, stats, plan.kept, bytes_in, bytes_out)


# --- GGUF export ---------------------------------------------------------------------------------

GgufTensor = tuple[str, Any, Any]


@dataclass
class GgufPlan:
    """The GGUF export of one source, decided from headers: the ternarised tensors, those kept in
    high precision (and why), and every output tensor's layout in write order."""

    qtype: str
    chosen: set[str] = field(default_factory=set)
    kept: dict[str, str] = field(default_factory=dict)
    layouts: list[Any] = field(default_factory=list)  # gguf_export.GgufLayout, one per input tensor


def plan_gguf_export(source: TensorSource, selector: TensorSelector, qtype: str = "tq2_0") -> GgufPlan:
    """Plan the GGUF export: selected 2-D weights whose rows are a multiple of 256 are ternarised,
    everything else is written in high precision (no tensor data is read)."""
    from mergesmith.bitnet import gguf_export

    config = source.config
    try:
        gguf_export.gguf_architecture(config)
        gguf_export.ggml_type(qtype)
    except ValueError as exc:
        raise MergeError(str(exc)) from exc
    plan = GgufPlan(qtype)
    for name, entry in source.tensors.items():
        shape = tuple(entry.shape)
        if selector.selects(name, shape):
            if gguf_export.ternary_fits(shape):
                plan.chosen.add(name)
            else:
                plan.kept[name[: -len(".weight")]] = f"in_features {shape[1]} is not a multiple of 256"
        try:
            layout = gguf_export.gguf_layout(name, shape, entry.dtype, name in plan.chosen, config, qtype)
        except ValueError as exc:
            raise MergeError(f"{name}: {exc}") from exc
        plan.layouts.append(layout)
    return plan


def iter_gguf_tensors(
    source: TensorSource, plan: GgufPlan
) -> Iterator[tuple[GgufTensor, LayerStat | None, int]]:
    """Yield one GGUF tensor ``(name, array, type)`` per input tensor, in the order of
    ``plan.layouts``, with its stat (ternarised tensors) and input bytes."""
    from mergesmith.bitnet import gguf_export

    for name, entry in source.tensors.items():
        tensor = _finite(name, source.read(name))
        try:
            if name not in plan.chosen:
                out = gguf_export.gguf_tensor(name, tensor, None, source.config, plan.qtype)
                yield out, None, _nbytes(tensor)
                continue
            ternary, was = ternary_of(tensor)
            stat = LayerStat(name, tuple(entry.shape), ternary.zero_fraction(), was, float(ternary.scale))
            out = gguf_export.gguf_tensor(name, None, ternary, source.config, plan.qtype)
        except ValueError as exc:
            raise MergeError(f"{name}: {exc}") from exc
        yield out, stat, _nbytes(tensor)
