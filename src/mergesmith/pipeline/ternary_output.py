"""``merge --out-format bitnet``: each eligible merged tensor is ternarised on its way to the writer.

The merge itself runs in float as always (on latent weights, or on packed BitNet inputs read as
``gamma * W~`` by :class:`mergesmith.core.bitnet.source.BitnetModelSource`); only the output changes. A
merged weight ``W`` of a converted module ``m`` is written as transformers' BitNet checkpoint holds it
(see :mod:`mergesmith.core.bitnet.hf`)::

    gamma = max(mean|W|, eps),  W~ = RoundClip(W / gamma, -1, 1)     (absmean, as ``mergesmith bitnet``)
    m.weight       = pack(W~)                       uint8 (out/4, in)
    m.weight_scale = gamma (autobitlinear) or 1/gamma (bitlinear)    (1,), in the merge's output dtype
    m.bias         = b / weight_scale (autobitlinear) or b

A merged tensor that is already ternary ({-a, 0, a}: a copy of a BitNet input, say) keeps ``a`` as
its scale, like ``mergesmith bitnet`` does. The converted modules are the ones ``mergesmith bitnet``
would convert: linear weights inside decoder layers whose ``out_features`` is a multiple of 4; every
other tensor is written as merged, and ``config.json`` gets the ``quantization_config``.

Streaming: a tensor merged in one piece is ternarised whole (exactly ``ternary_of``). A tensor the
executor merges in row chunks (it does not fit the memory budget) is merged twice: a first pass only
gathers ``sum|W|`` and the magnitude range (:class:`mergesmith.core.bitnet.quant.TernaryScan`), the second
ternarises each chunk with the final ``gamma`` and ORs its 2-bit codes into a packed buffer of
``numel / 4`` bytes, written when the last row is in.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch

from mergesmith.core.bitnet.constants import DEFAULT_LINEAR_CLASS
from mergesmith.core.bitnet.hf import export_config, linear_module_names, plan_hf, weight_scale_tensor
from mergesmith.core.bitnet.pack import pack_rows_into, pack_ternary, packed_rows
from mergesmith.core.bitnet.quant import TensorSelector, TernaryScan, ternary_of
from mergesmith.core.errors import MergeError
from mergesmith.core.write import ShardedWriter, TensorSpec
from mergesmith.pipeline.execute import row_elems
from mergesmith.pipeline.plan import MergePlan, OutputTensor


@dataclass
class TernaryStat:
    """One ternarised output weight: its name, the fraction of zero codes, and whether the merged
    tensor was already ternary."""

    name: str
    zero_fraction: float
    already_ternary: bool


class TernaryOutput:
    """The BitNet output of one merge plan: which modules become ternary, the output tensors and config."""

    def __init__(
        self,
        plan: MergePlan,
        selector: TensorSelector | None = None,
        linear_class: str = DEFAULT_LINEAR_CLASS,
    ) -> None:
        try:
            linear = linear_module_names(plan.out_config)
        except ValueError as exc:
            raise MergeError(f"--out-format bitnet: {exc}") from None
        chosen = plan_hf({t.name: t.shape for t in plan.tensors}, linear, selector or TensorSelector())
        floats = {t.name for t in plan.tensors if t.out_dtype.is_floating_point}
        self.modules = {m for m in chosen.ternary if f"{m}.weight" in floats}
        if not self.modules:
            raise MergeError(
                "--out-format bitnet: no merged tensor is a linear weight of a decoder layer that can be "
                "ternarised (out_features a multiple of 4)"
            )
        self.kept = chosen.kept
        not_converted = set(chosen.modules_to_not_convert) | (set(chosen.ternary) - self.modules)
        self.config = export_config(plan.out_config, not_converted, linear_class)
        self.linear_class = linear_class
        self.tensors = plan.tensors

    def specs(self) -> list[TensorSpec]:
        """Every output tensor in plan order: a converted weight becomes its packed codes and scale."""
        specs: list[TensorSpec] = []
        for t in self.tensors:
            module = t.name[: -len(".weight")]
            if t.name.endswith(".weight") and module in self.modules:
                specs.append(TensorSpec(t.name, "U8", (packed_rows(t.shape[0]), *t.shape[1:])))
                specs.append(TensorSpec(f"{module}.weight_scale", t.out_code, (1,)))
            else:
                specs.append(TensorSpec(t.name, t.out_code, t.shape))
        return specs

    def hook(self, writer: ShardedWriter) -> TernaryHook:
        """The executor hook that writes through ``writer``."""
        return TernaryHook(writer, self.modules, self.linear_class)


class TernaryHook:
    """:class:`mergesmith.pipeline.execute.OutputHook` for the BitNet output (see the module docstring).

    Thread-safe: chunks of one tensor come from one worker; a bias and its weight may come from two,
    in either order, so an autobitlinear bias waits (a 1-D tensor, held in memory) for its scale.
    """

    def __init__(self, writer: ShardedWriter, modules: set[str], linear_class: str) -> None:
        self.writer = writer
        self.modules = modules
        self.linear_class = linear_class
        self.stats: list[TernaryStat] = []
        self._lock = threading.Lock()
        self._scans: dict[str, TernaryScan] = {}
        self._packing: dict[str, tuple[torch.Tensor, list[int]]] = {}  # name -> (buffer, [rows, zeros])
        self._scales: dict[str, torch.Tensor] = {}  # module -> stored weight_scale
        self._biases: dict[str, tuple[str, torch.Tensor]] = {}  # module -> bias waiting for its scale

    def _role(self, name: str) -> tuple[str, str] | None:
        module, _, leaf = name.rpartition(".")
        return (module, leaf) if module in self.modules and leaf in ("weight", "bias") else None

    def scans(self, t: OutputTensor) -> bool:
        role = self._role(t.name)
        return role is not None and role[1] == "weight"

    def scan(self, t: OutputTensor, data: torch.Tensor, span: tuple[int, int] | None) -> None:
        self._scans.setdefault(t.name, TernaryScan()).update(data)

    def write(self, t: OutputTensor, data: torch.Tensor, span: tuple[int, int] | None) -> None:
        role = self._role(t.name)
        if role is None:
            offset = span[0] * row_elems(t) * t.out_dtype.itemsize if span else 0
            self.writer.write(t.name, data, offset)
        elif role[1] == "bias":
            self._bias(role[0], t.name, data)
        elif span is None or span == (0, t.shape[0]):
            ternary, was = ternary_of(data)
            stat = TernaryStat(t.name, ternary.zero_fraction(), was)
            self._weight(t, role[0], pack_ternary(ternary.codes), ternary.scale, stat)
        else:
            self._weight_rows(t, role[0], data, span)

    def _weight_rows(self, t: OutputTensor, module: str, data: torch.Tensor, span: tuple[int, int]) -> None:
        """Pack one row chunk with the scale from the scan; write the weight after its last row."""
        scan = self._scans[t.name]
        buffer, counts = self._packing.setdefault(
            t.name, (torch.zeros((packed_rows(t.shape[0]), *t.shape[1:]), dtype=torch.uint8), [0, 0])
        )
        codes = scan.codes(data)
        pack_rows_into(buffer, codes, span[0])
        counts[0] += span[1] - span[0]
        counts[1] += int((codes == 0).sum())
        if counts[0] == t.shape[0]:
            del self._packing[t.name], self._scans[t.name]
            stat = TernaryStat(t.name, counts[1] / max(t.numel, 1), scan.already_ternary())
            self._weight(t, module, buffer, scan.scale(), stat)

    def _weight(
        self, t: OutputTensor, module: str, packed: torch.Tensor, gamma: torch.Tensor, stat: TernaryStat
    ) -> None:
        scale = weight_scale_tensor(gamma, self.linear_class, t.out_dtype)
        self.writer.write(t.name, packed)
        self.writer.write(f"{module}.weight_scale", scale)
        with self._lock:
            self.stats.append(stat)
            self._scales[module] = scale
            waiting = self._biases.pop(module, None)
        if waiting is not None:
            self._write_bias(*waiting, scale)

    def _bias(self, module: str, name: str, data: torch.Tensor) -> None:
        if self.linear_class != "autobitlinear":
            self.writer.write(name, data)
            return
        with self._lock:
            scale = self._scales.get(module)
            if scale is None:
                self._biases[module] = (name, data)
                return
        self._write_bias(name, data, scale)

    def _write_bias(self, name: str, data: torch.Tensor, scale: torch.Tensor) -> None:
        """autobitlinear adds the bias before multiplying by ``weight_scale``: store ``b / weight_scale``."""
        self.writer.write(name, (data.to(torch.float32) / scale.to(torch.float32)).to(data.dtype))
