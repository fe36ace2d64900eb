"""Reference W1.58A8 forward: packed ternary weights, int8 per-token activations, integer accumulation.

BitNet b1.58 (arXiv 2402.17764, and the 2B4T report arXiv 2504.12285) computes each BitLinear as::

    s_x = 127 / max(max_j |x_j|, 1e-5)             one scale per token (last dimension)
    x_q = clamp(round(x * s_x), -128, 127)         int8
    acc = x_q . W~^T                               exact integer sum (int32), W~ in {-1, 0, 1}
    y   = acc * gamma / s_x  (+ bias)

This module does exactly that without ever unpacking a whole matrix: the packed weight is read in
blocks of ``block_rows`` packed rows (each yields four blocks of output rows, one per 2-bit chunk)
and ``block_cols`` input columns, so the extra memory is one ``block_rows x block_cols`` int32 tile.
It is a golden reference for the exporters, not a fast kernel.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from torch import nn

from mergesmith.core.bitnet.pack import VALUES_PER_BYTE, pack_ternary, unpack_chunk
from mergesmith.core.bitnet.quant import Ternary
from mergesmith.core.errors import MergeError

ACT_EPS = 1e-5
QMIN, QMAX = -128, 127


def quantize_activations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token absmax int8: ``(x_q int8, s_x float32 of shape (..., 1))`` with ``x ~= x_q / s_x``.

    Computed in float32, as transformers' ``ActQuant`` does.
    """
    xf = x.to(torch.float32)
    s_x = QMAX / xf.abs().amax(dim=-1, keepdim=True).clamp(min=ACT_EPS)
    x_q = (xf * s_x).round().clamp(QMIN, QMAX).to(torch.int8)
    return x_q, s_x


def fake_quantize_activations(x: torch.Tensor) -> torch.Tensor:
    """``x_q / s_x`` in float32 (the float view of the int8 activations)."""
    x_q, s_x = quantize_activations(x)
    return x_q.to(torch.float32) / s_x


def ternary_matmul_int(
    x_q: torch.Tensor,
    packed: torch.Tensor,
    out_features: int,
    block_rows: int = 64,
    block_cols: int = 1024,
) -> torch.Tensor:
    """``x_q . W~^T`` as int32, for int8 ``x_q`` of shape (..., in) and packed ``W~`` (ceil(out/4), in).

    Exact: each partial sum is an integer below ``128 * in`` in magnitude (fits int32 for
    ``in < 2**24``).
    """
    in_features = packed.shape[1]
    if x_q.shape[-1] != in_features:
        raise ValueError(f"activation has {x_q.shape[-1]} features, weight has {in_features}")
    lead = x_q.shape[:-1]
    xi = x_q.reshape(-1, in_features).to(torch.int32)
    acc = torch.zeros((xi.shape[0], out_features), dtype=torch.int32)
    r_total = packed.shape[0]
    for r0 in range(0, r_total, block_rows):
        block = packed[r0 : r0 + block_rows]
        for chunk in range(VALUES_PER_BYTE):
            first = chunk * r_total + r0
            n = min(block.shape[0], out_features - first)
            if n <= 0:
                continue
            for c0 in range(0, in_features, block_cols):
                tile = unpack_chunk(block[:n, c0 : c0 + block_cols], chunk).to(torch.int32)
                acc[:, first : first + n] += xi[:, c0 : c0 + block_cols] @ tile.T
    return acc.reshape(*lead, out_features)


def ternary_linear(
    x: torch.Tensor,
    packed: torch.Tensor,
    out_features: int,
    gamma: torch.Tensor | float,
    bias: torch.Tensor | None = None,
    block_rows: int = 64,
    block_cols: int = 1024,
) -> torch.Tensor:
    """W1.58A8 linear: ``y = (x_q . W~^T) * gamma / s_x + bias``, returned in ``x.dtype``.

    The rescale runs in float32, or in float64 for float64 input (the activation scale itself is
    always computed in float32, like transformers' ``ActQuant``).
    """
    x_q, s_x = quantize_activations(x)
    acc = ternary_matmul_int(x_q, packed, out_features, block_rows, block_cols)
    work = torch.float64 if x.dtype == torch.float64 else torch.float32
    y = acc.to(work) / s_x.to(work) * torch.as_tensor(gamma, dtype=work)
    if bias is not None:
        y = y + bias.to(work)
    return y.to(x.dtype)


class TernaryLinear(nn.Module):
    """Drop-in for ``nn.Linear`` holding packed ternary weights and ``gamma``; forward is
    :func:`ternary_linear`."""

    def __init__(self, ternary: Ternary, bias: torch.Tensor | None = None, block_rows: int = 64) -> None:
        super().__init__()
        self._hold(pack_ternary(ternary.codes), ternary.codes.shape[0], ternary.scale, bias, block_rows)

    @classmethod
    def from_packed(
        cls,
        packed: torch.Tensor,
        out_features: int,
        gamma: torch.Tensor | float,
        bias: torch.Tensor | None = None,
        block_rows: int = 64,
    ) -> TernaryLinear:
        """A module around already packed codes (uint8 ``(ceil(out/4), in)``), without unpacking them."""
        module = cls.__new__(cls)
        nn.Module.__init__(module)
        module._hold(packed, out_features, gamma, bias, block_rows)
        return module

    def _hold(
        self,
        packed: torch.Tensor,
        out_features: int,
        gamma: torch.Tensor | float,
        bias: torch.Tensor | None,
        block_rows: int,
    ) -> None:
        self.out_features, self.in_features = out_features, packed.shape[1]
        self.register_buffer("packed", packed)
        self.register_buffer("gamma", torch.as_tensor(gamma, dtype=torch.float32).reshape(()))
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self.block_rows = block_rows

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ternary_linear(x, self.packed, self.out_features, self.gamma, self.bias, self.block_rows)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, W1.58A8"


def swap_in_ternary(model: nn.Module, ternaries: Mapping[str, Ternary]) -> nn.Module:
    """Replace each ``nn.Linear`` named in ``ternaries`` (module name -> codes and gamma) by a
    :class:`TernaryLinear` that keeps the module's bias. Modifies and returns ``model``."""
    for name, ternary in ternaries.items():
        old = model.get_submodule(name)
        if not isinstance(old, nn.Linear):
            raise TypeError(f"{name} is {type(old).__name__}, not nn.Linear")
        if tuple(ternary.codes.shape) != (old.out_features, old.in_features):
            raise ValueError(f"{name}: codes {tuple(ternary.codes.shape)} do not fit {old}")
        model.set_submodule(name, TernaryLinear(ternary, old.bias))
    return model


def reference_model(
    config: Mapping[str, object],
    state_dict: Mapping[str, torch.Tensor],
    ternaries: Mapping[str, Ternary],
) -> nn.Module:
    """The float transformers model of ``config`` with ``state_dict`` loaded and the linear modules in
    ``ternaries`` swapped for :class:`TernaryLinear` (mergesmith's own W1.58A8 forward)."""
    import transformers

    cfg = {k: v for k, v in config.items() if k not in ("quantization_config", "auto_map")}
    model_type = cfg.pop("model_type")
    conf = transformers.AutoConfig.for_model(model_type, **cfg)
    model = transformers.AutoModelForCausalLM.from_config(conf, trust_remote_code=False)
    model.load_state_dict(dict(state_dict), strict=False)
    model.eval()
    return swap_in_ternary(model, ternaries)


@contextlib.contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Modules built inside get their parameters on the meta device (no memory) and their buffers
    (e.g. rotary frequencies, computed at construction) on the CPU."""
    register = nn.Module.register_parameter

    def on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        register(module, name, param)
        if param is not None:
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = on_meta  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = register  # type: ignore[method-assign]


def load_reference_model(path: str | Path) -> nn.Module:
    """A packed BitNet checkpoint as mergesmith's reference W1.58A8 model, never unpacking a matrix.

    The transformers model of the checkpoint's (float) config is built with its parameters on the
    meta device; each packed linear becomes a :class:`TernaryLinear` around the stored packed bytes
    and ``gamma``; every other parameter is read from the checkpoint one tensor at a time. Memory:
    2 bits per ternary weight plus the high-precision tensors, and one unpacked tile while running.
    """
    import transformers

    from mergesmith.core.bitnet.source import BitnetModelSource
    from mergesmith.core.sources import open_checkpoint

    src = open_checkpoint(str(path))
    if not isinstance(src, BitnetModelSource):
        raise MergeError(f"{path}: not a packed BitNet checkpoint (no offline quant_method bitnet)")
    cfg = {k: v for k, v in src.config.items() if k != "auto_map"}  # built-in classes only
    conf = transformers.AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    try:
        with _parameters_on_meta():
            model = transformers.AutoModelForCausalLM.from_config(conf, trust_remote_code=False)
        for module in src.packed_modules():
            bias = src.read(f"{module}.bias") if f"{module}.bias" in src.tensors else None
            rows = src.tensors[f"{module}.weight"].shape[0]
            ternary = TernaryLinear.from_packed(src.read_packed(module), rows, src.gamma(module), bias)
            model.set_submodule(module, ternary)
        for name, param in list(model.named_parameters()):
            if param.is_meta and name in src.tensors:
                owner, _, leaf = name.rpartition(".")
                data = src.read(name)
                model.get_submodule(owner)._parameters[leaf] = nn.Parameter(data, requires_grad=False)
        model.tie_weights()
    finally:
        src.close()
    missing = [n for n, p in model.named_parameters() if p.is_meta]
    if missing:
        raise MergeError(f"{path}: the checkpoint has no tensor {missing[0]!r}")
    return model.eval()
