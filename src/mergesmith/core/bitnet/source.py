"""A packed BitNet checkpoint read as the float model it stands for, tensor by tensor.

A transformers ``quant_method: "bitnet"`` checkpoint (offline mode; what ``mergesmith bitnet`` and
``mergesmith merge --out-format bitnet`` write) stores each converted linear module as

* ``<m>.weight``: uint8 ``(R, in)`` with ``R = ceil(out / 4)``; unpacked row ``u`` is 2-bit chunk
  ``i = u // R`` of packed row ``r = u % R`` (see :mod:`mergesmith.core.bitnet.pack`);
* ``<m>.weight_scale``: ``(1,)`` in the model dtype, ``gamma`` (autobitlinear) or ``1 / gamma``
  (bitlinear);
* ``<m>.bias`` (if any): ``b / gamma`` for autobitlinear (transformers adds it before scaling), ``b``
  for bitlinear.

:class:`BitnetModelSource` shows every such module as its float weight ``W = gamma * W~`` and bias
``b``, hides the ``weight_scale`` tensors and drops ``quantization_config`` from the config, so the
merge engine sees an ordinary float model. ``read(name, rows)`` reads and unpacks only the packed
rows that hold the requested rows.

Unpacked dtype: the stored ``weight_scale``'s dtype (the model dtype) for autobitlinear, where
``gamma`` is that stored number and ``gamma * W~`` in {-gamma, 0, gamma} is exact in it; float32 for
bitlinear, where ``gamma = 1 / weight_scale`` is generally not representable in a 16-bit dtype.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import torch

from mergesmith.core.bitnet.pack import VALUES_PER_BYTE, chunk_spans, packed_rows, unpack_chunk
from mergesmith.core.dtypes import FLOAT_CODES
from mergesmith.core.errors import MergeError
from mergesmith.core.model import ModelSource, TensorInfo, read_tensor

SCALE_SUFFIX = ".weight_scale"


def bitnet_quantization(config: Mapping[str, Any]) -> dict[str, Any] | None:
    """The config's ``quantization_config`` when it is an offline BitNet one (packed weights), else None."""
    qc = config.get("quantization_config")
    if isinstance(qc, Mapping) and qc.get("quant_method") == "bitnet":
        if qc.get("quantization_mode", "offline") == "offline":
            return dict(qc)
    return None


@dataclass(frozen=True)
class PackedTensorInfo(TensorInfo):
    """A packed ternary weight as the float tensor it unpacks to: ``dtype`` and ``shape`` are the
    float ones; ``packed`` and ``scale`` say where the stored uint8 codes and ``weight_scale`` are."""

    packed: TensorInfo
    scale: TensorInfo


class BitnetModelSource(ModelSource):
    """A packed BitNet checkpoint as a float :class:`~mergesmith.core.model.ModelSource` (see the module).

    ``out_features`` maps a module name to its true row count, for packed weights whose row count is
    not ``4 * R`` (transformers itself only writes and loads ``4 * R`` rows, the default).
    """

    def __init__(self, ref: str, path: Path, out_features: Mapping[str, int] | None = None):
        super().__init__(ref, path)
        self._out_features = dict(out_features or {})
        self._gammas: dict[str, torch.Tensor] = {}

    def __repr__(self) -> str:
        return f"BitnetModelSource({self.ref!r})"

    @cached_property
    def stored_config(self) -> dict:
        """config.json as stored, with its ``quantization_config``."""
        return ModelSource.config.func(self)  # type: ignore[attr-defined]

    @cached_property
    def quantization(self) -> dict[str, Any]:
        qc = bitnet_quantization(self.stored_config)
        if qc is None:
            raise MergeError(f"model {self.ref!r}: config.json has no offline BitNet quantization_config")
        return qc

    @property
    def linear_class(self) -> str:
        return str(self.quantization.get("linear_class", "bitlinear"))

    @cached_property
    def config(self) -> dict:
        """The float model's config: the stored one without ``quantization_config``."""
        return {k: v for k, v in self.stored_config.items() if k != "quantization_config"}

    @cached_property
    def stored(self) -> dict[str, TensorInfo]:
        """The tensors as stored (packed weights, scales)."""
        return ModelSource.tensors.func(self)  # type: ignore[attr-defined]

    @cached_property
    def tensors(self) -> dict[str, TensorInfo]:
        """Every stored tensor except the scales; packed weights as :class:`PackedTensorInfo`."""
        _ = self.quantization
        stored = self.stored
        out: dict[str, TensorInfo] = {}
        for name, info in stored.items():
            if name.endswith(SCALE_SUFFIX) and name[: -len("_scale")] in stored:
                continue
            scale = stored.get(name + "_scale") if name.endswith(".weight") else None
            out[name] = info if scale is None else self._unpacked_info(info, scale)
        return out

    def _unpacked_info(self, packed: TensorInfo, scale: TensorInfo) -> TensorInfo:
        module = packed.name[: -len(".weight")]
        if packed.code != "U8" or len(packed.shape) != 2 or scale.numel != 1:
            raise MergeError(
                f"model {self.ref!r}: {packed.name} has a weight_scale but is not a packed uint8 matrix "
                f"with one scale ({packed.dtype}, {list(packed.shape)})"
            )
        rows = self._out_features.get(module, packed.shape[0] * VALUES_PER_BYTE)
        if packed_rows(rows) != packed.shape[0]:
            raise MergeError(
                f"model {self.ref!r}: {module} has {rows} rows, which do not pack into {packed.shape[0]}"
            )
        code = scale.code if self.linear_class == "autobitlinear" else "F32"
        if code not in FLOAT_CODES:
            raise MergeError(f"model {self.ref!r}: {scale.name} has dtype {scale.dtype}, expected a float")
        shape = (rows, packed.shape[1])
        return PackedTensorInfo(packed.name, code, shape, packed.file, packed.offset, packed, scale)

    def gamma(self, module: str) -> torch.Tensor:
        """``gamma`` of a packed module as a float32 0-d tensor: ``weight_scale`` or its inverse."""
        g = self._gammas.get(module)
        if g is None:
            info = self.stored[module + SCALE_SUFFIX]
            s = read_tensor(info, None, self._fd(info.file)).to(torch.float32).reshape(())
            g = self._gammas[module] = s if self.linear_class == "autobitlinear" else 1.0 / s
        return g

    def read(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """Tensor ``name`` (rows ``[r0, r1)`` if given) as the float model has it.

        Packed weights: ``gamma * W~[r0:r1]``, reading only the packed rows that hold those rows.
        autobitlinear biases: ``stored bias * weight_scale`` in float32, cast to the bias dtype.
        """
        info = self.tensors.get(name)
        if isinstance(info, PackedTensorInfo):
            return self._read_packed(info, rows)
        data = super().read(name, rows)
        module = name[: -len(".bias")]
        if name.endswith(".bias") and self.linear_class == "autobitlinear" and self._is_packed(module):
            data = (data.to(torch.float32) * self.gamma(module)).to(data.dtype)
        return data

    def _is_packed(self, module: str) -> bool:
        return isinstance(self.tensors.get(module + ".weight"), PackedTensorInfo)

    def _read_packed(self, info: PackedTensorInfo, rows: tuple[int, int] | None) -> torch.Tensor:
        u0, u1 = rows if rows is not None else (0, info.shape[0])
        if not 0 <= u0 <= u1 <= info.shape[0]:
            raise MergeError(f"internal error: rows {u0}..{u1} outside {info.name} ({info.shape[0]} rows)")
        fd = self._fd(info.packed.file)
        pieces = [
            unpack_chunk(read_tensor(info.packed, (p0, p1), fd), i)
            for i, p0, p1 in chunk_spans((u0, u1), info.packed.shape[0])
        ]
        codes = torch.cat(pieces) if pieces else torch.empty((0, info.shape[1]), dtype=torch.int8)
        gamma = self.gamma(info.name[: -len(".weight")])
        return codes.to(torch.float32).mul_(gamma).to(info.dtype)  # one float32 buffer

    def read_packed(self, module: str) -> torch.Tensor:
        """The stored packed codes of ``module`` (uint8 ``(ceil(out/4), in)``), not unpacked."""
        info = self.tensors[f"{module}.weight"]
        if not isinstance(info, PackedTensorInfo):
            raise MergeError(f"model {self.ref!r}: {module} is not stored packed")
        return read_tensor(info.packed, None, self._fd(info.packed.file))

    def packed_modules(self) -> list[str]:
        """Names of the modules stored packed."""
        return [n[: -len(".weight")] for n, i in self.tensors.items() if isinstance(i, PackedTensorInfo)]
