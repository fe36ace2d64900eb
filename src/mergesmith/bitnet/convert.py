"""Tensor-by-tensor drivers: read a source's tensors one at a time, hand back converted tensors.

A *source* is anything with ``config`` (dict), ``shapes`` (name -> shape), ``dtype(name)`` and
``get(name)``: :class:`mergesmith.bitnet.io.SafetensorsFolder`, :class:`DictSource` (tests), or
:class:`DequantizedBitNetSource`, which presents a packed transformers BitNet checkpoint as float
weights ``gamma * W~`` so that it can be re-exported (to GGUF, or to the other linear class).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from mergesmith.bitnet.hf import (
    DEFAULT_LINEAR_CLASS,
    export_config,
    export_linear,
    gamma_from_weight_scale,
    input_quantization,
    linear_module_names,
    plan_hf,
)
from mergesmith.bitnet.pack import unpack_ternary
from mergesmith.bitnet.quant import TensorSelector, Ternary, as_ternary, ternarize_tensor
from mergesmith.errors import MergeError


class TensorSource(Protocol):
    config: dict[str, Any]

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]: ...

    def dtype(self, name: str) -> torch.dtype: ...

    def get(self, name: str) -> torch.Tensor: ...


class DictSource:
    """An in-memory source (a state dict and a config dict)."""

    def __init__(self, state_dict: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> None:
        self._sd = dict(state_dict)
        self.config = dict(config)

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: tuple(v.shape) for k, v in self._sd.items()}

    def dtype(self, name: str) -> torch.dtype:
        return self._sd[name].dtype

    def get(self, name: str) -> torch.Tensor:
        return self._sd[name]


class DequantizedBitNetSource:
    """A transformers BitNet checkpoint (offline, either linear class) seen as float weights.

    Each packed ``<m>.weight`` (uint8) with ``<m>.weight_scale`` is shown as ``gamma * W~`` in float32
    (exactly ternary, so :func:`as_ternary` recovers codes and ``gamma``); the ``weight_scale``
    tensors are hidden and autobitlinear biases are multiplied back by the scale.
    """

    def __init__(self, inner: TensorSource) -> None:
        qc = input_quantization(inner.config)
        if qc is None or qc.get("quantization_mode", "offline") != "offline":
            raise ValueError("not an offline transformers BitNet checkpoint")
        self.inner = inner
        self.linear_class: str = qc.get("linear_class", "bitlinear")
        self.config = {k: v for k, v in inner.config.items() if k != "quantization_config"}
        inner_shapes = inner.shapes
        self._packed = {
            n[: -len(".weight_scale")]
            for n in inner_shapes
            if n.endswith(".weight_scale") and inner.dtype(n[: -len("_scale")]) == torch.uint8
        }
        self._shapes: dict[str, tuple[int, ...]] = {}
        for name, shape in inner_shapes.items():
            module, _, leaf = name.rpartition(".")
            if module in self._packed and leaf == "weight_scale":
                continue
            if module in self._packed and leaf == "weight":
                shape = (shape[0] * 4, *shape[1:])
            self._shapes[name] = shape

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        return dict(self._shapes)

    def dtype(self, name: str) -> torch.dtype:
        module, _, leaf = name.rpartition(".")
        if module in self._packed and leaf == "weight":
            return torch.float32
        return self.inner.dtype(name)

    def scale_dtype(self, module: str) -> torch.dtype | None:
        """dtype of the stored ``weight_scale`` of a packed module (the model dtype), else None."""
        return self.inner.dtype(f"{module}.weight_scale") if module in self._packed else None

    def _gamma(self, module: str) -> torch.Tensor:
        return gamma_from_weight_scale(self.inner.get(f"{module}.weight_scale"), self.linear_class)

    def get(self, name: str) -> torch.Tensor:
        module, _, leaf = name.rpartition(".")
        if module in self._packed and leaf == "weight":
            t = Ternary(unpack_ternary(self.inner.get(name)), self._gamma(module))
            return t.dequantize(torch.float32)
        tensor = self.inner.get(name)
        if module in self._packed and leaf == "bias" and self.linear_class == "autobitlinear":
            scale = self.inner.get(f"{module}.weight_scale").to(torch.float32)
            tensor = (tensor.to(torch.float32) * scale).to(tensor.dtype)
        return tensor


def open_source(source: TensorSource) -> TensorSource:
    """Wrap a packed BitNet checkpoint in :class:`DequantizedBitNetSource`; return others as they are."""
    qc = input_quantization(source.config)
    if qc is not None and qc.get("quantization_mode", "offline") == "offline":
        return DequantizedBitNetSource(source)
    return source


def ternary_of(weight: torch.Tensor) -> tuple[Ternary, bool]:
    """Codes and gamma of ``weight``, and whether it was already ternary ({-a, 0, a}).

    An already-ternary weight keeps its own magnitude ``a`` as gamma (absmean would give
    ``a * (1 - zero_fraction)`` and scale it wrongly).
    """
    found = as_ternary(weight)
    if found is not None:
        return found, True
    return ternarize_tensor(weight), False


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


@dataclass
class HfExport:
    """Result of :func:`export_hf`: converted tensors in input order, the new config, statistics."""

    tensors: dict[str, torch.Tensor]
    config: dict[str, Any]
    stats: list[LayerStat]
    kept: dict[str, str]
    bytes_in: int
    bytes_out: int


def iter_hf_tensors(
    source: TensorSource, selector: TensorSelector, linear_class: str = DEFAULT_LINEAR_CLASS
) -> tuple[dict[str, Any], dict[str, str], Iterator[tuple[dict[str, torch.Tensor], LayerStat | None, int]]]:
    """Plan the transformers export and return ``(config, kept, stream)``.

    ``stream`` yields ``(output tensors, stat or None, input bytes)`` one input tensor (or one
    weight+bias pair) at a time, so a writer can flush as it goes.
    """
    source = open_source(source)
    try:
        linear = linear_module_names(source.config)
    except ValueError as exc:
        raise MergeError(str(exc)) from exc
    shapes = source.shapes
    plan = plan_hf(shapes, linear, selector)
    config = export_config(source.config, plan.modules_to_not_convert, linear_class)
    ternary_modules = set(plan.ternary)

    def stream() -> Iterator[tuple[dict[str, torch.Tensor], LayerStat | None, int]]:
        for name, shape in shapes.items():
            module, _, leaf = name.rpartition(".")
            if module in ternary_modules and leaf == "bias":
                continue  # written with its weight
            tensor = source.get(name)
            if module not in ternary_modules or leaf != "weight":
                yield {name: tensor}, None, _nbytes(tensor)
                continue
            bias_name = f"{module}.bias"
            bias = source.get(bias_name) if bias_name in shapes else None
            ternary, was = ternary_of(tensor)
            dtype = tensor.dtype if tensor.is_floating_point() else torch.float32
            if isinstance(source, DequantizedBitNetSource):
                dtype = source.scale_dtype(module) or dtype
            out = export_linear(module, ternary, bias, linear_class, dtype)
            stat = LayerStat(name, tuple(shape), ternary.zero_fraction(), was, float(ternary.scale))
            nbytes = _nbytes(tensor) + (_nbytes(bias) if bias is not None else 0)
            yield out, stat, nbytes

    return config, plan.kept, stream()


def export_hf(
    source: TensorSource, selector: TensorSelector | None = None, linear_class: str = DEFAULT_LINEAR_CLASS
) -> HfExport:
    """Convert a whole source in memory (what the command writes to ``model.safetensors``)."""
    config, kept, stream = iter_hf_tensors(source, selector or TensorSelector(), linear_class)
    tensors: dict[str, torch.Tensor] = {}
    stats: list[LayerStat] = []
    bytes_in = 0
    for out, stat, nbytes in stream:
        tensors.update(out)
        bytes_in += nbytes
        if stat is not None:
            stats.append(stat)
    bytes_out = sum(_nbytes(t) for t in tensors.values())
    return HfExport(tensors, config, stats, kept, bytes_in, bytes_out)


GgufTensor = tuple[str, Any, Any]


def iter_gguf_tensors(
    source: TensorSource, selector: TensorSelector, qtype: str = "tq2_0"
) -> tuple[dict[str, str], Iterator[tuple[GgufTensor, LayerStat | None, int]]]:
    """Plan the GGUF export and return ``(kept, stream)``; ``stream`` yields one GGUF tensor
    ``(name, array, type)`` per input tensor. Ternarised: selected 2-D weights whose rows are a
    multiple of 256; everything else is written in high precision."""
    from mergesmith.bitnet import gguf_export

    source = open_source(source)
    try:
        gguf_export.gguf_architecture(source.config)
        gguf_export.ggml_type(qtype)
    except ValueError as exc:
        raise MergeError(str(exc)) from exc
    shapes = source.shapes
    kept: dict[str, str] = {}
    chosen: set[str] = set()
    for name, shape in shapes.items():
        if selector.selects(name, shape):
            if gguf_export.ternary_fits(shape):
                chosen.add(name)
            else:
                kept[name[: -len(".weight")]] = f"in_features {shape[1]} is not a multiple of 256"

    def stream() -> Iterator[tuple[GgufTensor, LayerStat | None, int]]:
        for name, shape in shapes.items():
            tensor = source.get(name)
            try:
                if name not in chosen:
                    yield (
                        gguf_export.gguf_tensor(name, tensor, None, source.config, qtype),
                        None,
                        _nbytes(tensor),
                    )
                    continue
                ternary, was = ternary_of(tensor)
                stat = LayerStat(name, tuple(shape), ternary.zero_fraction(), was, float(ternary.scale))
                out = gguf_export.gguf_tensor(name, None, ternary, source.config, qtype)
            except ValueError as exc:
                raise MergeError(f"{name}: {exc}") from exc
            yield out, stat, _nbytes(tensor)

    return kept, stream()
