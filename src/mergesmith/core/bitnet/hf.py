"""Export to a transformers ``quant_method: "bitnet"`` checkpoint, as pure functions on tensors and dicts.

What transformers (5.x, ``integrations/bitnet.py``) loads for each converted ``nn.Linear``:

* ``<module>.weight``: uint8, shape ``(out_features / 4, in_features)``, the 2-bit layout of
  :mod:`mergesmith.core.bitnet.pack`;
* ``<module>.weight_scale``: shape ``(1,)``, in the model dtype. Its meaning depends on the class:

  - ``linear_class="autobitlinear"`` (offline): ``AutoBitLinear.forward`` computes
    ``F.linear(ActQuant(x), W~, bias) * weight_scale``, so ``weight_scale = gamma`` and, because the
    bias is added *before* the multiplication, the stored bias is ``bias / gamma``;
  - ``linear_class="bitlinear"``: ``BitLinear.forward`` computes
    ``F.linear(x_q, W~) / (input_scale * weight_scale)`` then adds the bias, so
    ``weight_scale = 1 / gamma`` and the bias is stored as is.

* ``config.json["quantization_config"]``: ``quant_method``, ``linear_class``, ``quantization_mode``
  and ``modules_to_not_convert``. transformers replaces *every* ``nn.Linear`` not matched by that list,
  and when the list is given it does not add ``lm_head`` by itself, so the list names ``lm_head`` and
  every linear module left in high precision.

The round-trip test (``tests/bitnet/test_bitnet_hf_roundtrip.py``) is the evidence: transformers'
logits equal those of :mod:`mergesmith.bitnet.reference` for both classes.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from mergesmith.core.bitnet.constants import DEFAULT_LINEAR_CLASS, LINEAR_CLASSES
from mergesmith.core.bitnet.pack import VALUES_PER_BYTE, pack_ternary
from mergesmith.core.bitnet.quant import TensorSelector, Ternary


def _check_linear_class(linear_class: str) -> None:
    if linear_class not in LINEAR_CLASSES:
        raise ValueError(f"linear_class must be one of {LINEAR_CLASSES}, got {linear_class!r}")


def weight_scale_tensor(gamma: torch.Tensor | float, linear_class: str, dtype: torch.dtype) -> torch.Tensor:
    """The stored ``weight_scale`` (shape (1,), ``dtype``): ``gamma`` for autobitlinear, ``1/gamma``
    for bitlinear."""
    _check_linear_class(linear_class)
    g = torch.as_tensor(gamma, dtype=torch.float32).reshape(1)
    value = g if linear_class == "autobitlinear" else 1.0 / g
    return value.to(dtype)


def gamma_from_weight_scale(weight_scale: torch.Tensor, linear_class: str) -> torch.Tensor:
    """Inverse of :func:`weight_scale_tensor`, as a float32 0-d tensor."""
    _check_linear_class(linear_class)
    s = weight_scale.detach().to(torch.float32).reshape(())
    return s if linear_class == "autobitlinear" else 1.0 / s


def export_linear(
    prefix: str,
    ternary: Ternary,
    bias: torch.Tensor | None,
    linear_class: str = DEFAULT_LINEAR_CLASS,
    dtype: torch.dtype = torch.float32,
) -> dict[str, torch.Tensor]:
    """Tensors of one converted linear module ``prefix`` (e.g. ``model.layers.0.mlp.up_proj``).

    ``dtype`` is the model dtype, used for ``weight_scale`` (and the bias keeps its own dtype). For
    autobitlinear the bias is divided by the *stored* (rounded) scale so that transformers'
    ``(x W~ + b') * s`` gives back ``b``.
    """
    scale = weight_scale_tensor(ternary.scale, linear_class, dtype)
    out = {f"{prefix}.weight": pack_ternary(ternary.codes), f"{prefix}.weight_scale": scale}
    if bias is not None:
        if linear_class == "autobitlinear":
            bias = (bias.to(torch.float32) / scale.to(torch.float32)).to(bias.dtype)
        out[f"{prefix}.bias"] = bias
    return out


def quantization_config(
    modules_to_not_convert: Iterable[str], linear_class: str = DEFAULT_LINEAR_CLASS
) -> dict[str, Any]:
    """The ``quantization_config`` block (offline mode: weights are stored ternary)."""
    _check_linear_class(linear_class)
    return {
        "quant_method": "bitnet",
        "linear_class": linear_class,
        "quantization_mode": "offline",
        "modules_to_not_convert": sorted(set(modules_to_not_convert)),
        "use_rms_norm": False,
        "rms_norm_eps": 1e-6,
    }


def export_config(
    config: Mapping[str, Any], modules_to_not_convert: Iterable[str], linear_class: str = DEFAULT_LINEAR_CLASS
) -> dict[str, Any]:
    """``config`` with its ``quantization_config`` set (a new dict; the input is not modified), without
    ``auto_map``: the output never points transformers at Python files (remote code)."""
    out = dict(config)
    out.pop("auto_map", None)
    out["quantization_config"] = quantization_config(modules_to_not_convert, linear_class)
    return out


def input_quantization(config: Mapping[str, Any]) -> dict[str, Any] | None:
    """The input's BitNet ``quantization_config`` if it has one (a packed or QAT BitNet checkpoint)."""
    qc = config.get("quantization_config")
    if isinstance(qc, Mapping) and qc.get("quant_method") == "bitnet":
        return dict(qc)
    return None


def trained_ternary(config: Mapping[str, Any]) -> bool:
    """Whether the config says the model was trained ternary (so ternarising its latent weights is what
    its authors intended): a BitNet quantization_config, model_type ``bitnet``, or the 1bitLLM
    ``weight_bits: 1`` convention."""
    return (
        input_quantization(config) is not None
        or config.get("model_type") == "bitnet"
        or config.get("weight_bits") == 1
    )


def linear_module_names(config: Mapping[str, Any]) -> set[str]:
    """Names of the ``nn.Linear`` modules of the transformers model that ``config`` describes.

    The model is built on the meta device (no memory, no weights), so this is cheap even for large
    configs. Raises ValueError for a config transformers cannot build.
    """
    import transformers

    cfg = dict(config)
    cfg.pop("quantization_config", None)
    cfg.pop("auto_map", None)  # built-in classes only: never remote code
    model_type = cfg.pop("model_type", None)
    if not model_type:
        raise ValueError("config.json has no model_type")
    try:
        conf = transformers.AutoConfig.for_model(model_type, **cfg)
        with torch.device("meta"):
            model = transformers.AutoModelForCausalLM.from_config(conf, trust_remote_code=False)
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(
            f"transformers cannot build a causal LM for model_type {model_type!r}: {exc}"
        ) from exc
    return {name for name, mod in model.named_modules() if isinstance(mod, torch.nn.Linear)}


@dataclass
class Plan:
    """Which weights become ternary, and what stays in high precision and why."""

    ternary: list[str] = field(default_factory=list)
    """Module names (tensor name minus ``.weight``) whose weight is ternarised."""
    kept: dict[str, str] = field(default_factory=dict)
    """Module name -> reason, for linear modules left in high precision."""
    modules_to_not_convert: list[str] = field(default_factory=list)


def plan_hf(shapes: Mapping[str, Sequence[int]], linear_modules: set[str], selector: TensorSelector) -> Plan:
    """Decide, from tensor names and shapes only, what the transformers export ternarises.

    A weight is ternarised when the selector picks it, its module is an ``nn.Linear`` in transformers'
    model and its ``out_features`` is a multiple of 4 (transformers cannot load other packed shapes).
    Every other linear module goes to ``modules_to_not_convert`` (``lm_head`` always does).
    """
    plan = Plan()
    for name, shape in shapes.items():
        if not name.endswith(".weight"):
            continue
        module = name[: -len(".weight")]
        is_linear = module in linear_modules
        if not selector.selects(name, shape):
            if is_linear:
                plan.kept[module] = "not selected"
            continue
        if not is_linear:
            continue
        if shape[0] % VALUES_PER_BYTE:
            plan.kept[module] = f"out_features {shape[0]} is not a multiple of 4"
            continue
        plan.ternary.append(module)
    not_converted = set(plan.kept) | {"lm_head"}
    not_converted |= {m for m in linear_modules if m not in plan.ternary}
    plan.modules_to_not_convert = sorted(not_converted)
    return plan
