"""A PEFT LoRA adapter on disk: its settings, its tensor keys, and the per-module rank and scale.

Only what changes a merged weight is read. Settings that would change it in ways we do not implement
(DoRA, LoRA biases, layer replication, parameter targets, trainable tokens) are refused with a message,
never ignored: a silently wrong merge is worse than none.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import regex

from mergesmith.core.errors import MergeError
from mergesmith.core.model import (
    TensorInfo,
    model_file,
    pickle_hint,
    read_json_file,
    read_safetensors_header,
    regular_file,
)

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
# suffixes of PEFT's saved keys: (factor, is embedding)
FACTOR_SUFFIXES = {
    ".lora_A.weight": ("A", False),
    ".lora_B.weight": ("B", False),
    ".lora_embedding_A": ("A", True),
    ".lora_embedding_B": ("B", True),
}
# settings that change the merged weight in ways not implemented here: (key, value that is harmless)
UNSUPPORTED = {
    "use_dora": (False, "DoRA adapters (use_dora: true) are not supported"),
    "lora_bias": (False, "adapters with LoRA biases (lora_bias: true) are not supported"),
    "layer_replication": (None, "adapters with layer_replication are not supported"),
    "target_parameters": (None, "adapters with target_parameters are not supported"),
    "trainable_token_indices": (None, "adapters with trainable_token_indices are not supported"),
    "use_qalora": (False, "QA-LoRA adapters are not supported"),
}


#: An adapter's patterns come from a file we do not trust: a pattern that backtracks for longer than this
#: on one module name is refused rather than left to run for hours.
PATTERN_TIMEOUT_S = 1.0


def _pattern_regex(key: str) -> str:
    return rf"(.*\.)?({key})$"


def pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    """PEFT's rule for ``rank_pattern``/``alpha_pattern``: the first key that, as a regular expression,
    matches the end of the module name at a dot boundary."""
    for key, value in patterns.items():
        try:
            hit = regex.match(_pattern_regex(key), module, timeout=PATTERN_TIMEOUT_S)
        except TimeoutError:
            raise MergeError(
                f"LoRA pattern {key!r} takes more than {PATTERN_TIMEOUT_S:g} s to match module {module!r}; "
                "simplify it in adapter_config.json"
            ) from None
        if hit:
            return value
    return default


def _check_patterns(ref: str, name: str, patterns: Any, cast: type) -> dict[str, Any]:
    """``rank_pattern``/``alpha_pattern`` as a dict of compilable regexes to positive numbers."""
    if patterns is None:
        return {}
    if not isinstance(patterns, dict):
        raise MergeError(f"LoRA adapter {ref!r}: {ADAPTER_CONFIG} {name} is not a mapping of patterns")
    out: dict[str, Any] = {}
    for key, value in patterns.items():
        try:
            regex.compile(_pattern_regex(key))
        except (regex.error, RecursionError, OverflowError) as exc:
            raise MergeError(
                f"LoRA adapter {ref!r}: {ADAPTER_CONFIG} {name} key {key!r} is not a valid regular expression "
                f"({exc})"
            ) from None
        ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
        if not ok or value <= 0 or (cast is int and value != int(value)):
            kind = "a positive integer" if cast is int else "a positive number"
            raise MergeError(
                f"LoRA adapter {ref!r}: {ADAPTER_CONFIG} {name}[{key!r}] is {value!r}, not {kind}"
            )
        out[key] = cast(value)
    return out


@dataclass(frozen=True)
class LoraSettings:
    """The adapter_config.json entries that determine each module's scale."""

    r: int
    alpha: float
    use_rslora: bool = False
    fan_in_fan_out: bool = False
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)

    def rank(self, module: str) -> int:
        return int(pattern_value(self.rank_pattern, module, self.r))

    def scale(self, module: str) -> float:
        """lora_alpha / r, or lora_alpha / sqrt(r) for rsLoRA, with the module's patterns applied."""
        r = self.rank(module)
        alpha = float(pattern_value(self.alpha_pattern, module, self.alpha))
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r


@dataclass(frozen=True)
class LoraFactors:
    """One module's factors: delta = scale * B @ A (transposed when the weight is stored (in, out))."""

    module: str
    a: TensorInfo
    b: TensorInfo
    embedding: bool


@dataclass
class Adapter:
    """An adapter folder: settings, factor pairs by module, and whole tensors it replaces (by PEFT key)."""

    ref: str
    path: Path
    settings: LoraSettings
    factors: dict[str, LoraFactors]
    full: dict[str, TensorInfo]  # module path + ".weight"/".bias" (``base_layer.`` removed) -> tensor
    raw_config: dict[str, Any]

    @classmethod
    def open(cls, ref: str, path: Path) -> Adapter:
        config = _read_config(ref, path)
        settings = _settings(ref, config)
        weights = model_file(path, ADAPTER_WEIGHTS, ref, "LoRA adapter")
        if not regular_file(weights):
            raise MergeError(f"LoRA adapter {ref!r}: no {ADAPTER_WEIGHTS} in {path}{pickle_hint(path)}")
        factors, full = _split_keys(ref, read_safetensors_header(weights, ref, "LoRA adapter"))
        for f in factors.values():
            _check_rank(ref, f, settings)
        return cls(ref, path, settings, factors, full, config)


def _read_config(ref: str, path: Path) -> dict[str, Any]:
    cfg_path = model_file(path, ADAPTER_CONFIG, ref, "LoRA adapter")
    if not regular_file(cfg_path):
        raise MergeError(f"LoRA adapter {ref!r}: no {ADAPTER_CONFIG} in {path}; is it a PEFT adapter folder?")
    config = read_json_file(cfg_path, f"LoRA adapter {ref!r}: {ADAPTER_CONFIG}")
    if not isinstance(config, dict):
        raise MergeError(f"LoRA adapter {ref!r}: {ADAPTER_CONFIG} is not a JSON object")
    kind = config.get("peft_type", "LORA")
    if str(kind).upper() != "LORA":
        raise MergeError(f"LoRA adapter {ref!r}: is a {kind} adapter; only LoRA adapters can be applied")
    for key, (harmless, why) in UNSUPPORTED.items():
        value = config.get(key, harmless)
        if value not in (harmless, None, False, [], {}):
            raise MergeError(
                f"LoRA adapter {ref!r}: {why}; merge it into its base model with peft's merge_and_unload "
                "and use that folder instead"
            )
    return config


def _settings(ref: str, config: dict[str, Any]) -> LoraSettings:
    r, alpha = config.get("r"), config.get("lora_alpha", config.get("r"))
    if not (isinstance(r, int) and not isinstance(r, bool) and r >= 1):
        raise MergeError(f"LoRA adapter {ref!r}: {ADAPTER_CONFIG} 'r' is {r!r}, not a positive integer")
    if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not math.isfinite(alpha):
        raise MergeError(f"LoRA adapter {ref!r}: {ADAPTER_CONFIG} 'lora_alpha' is {alpha!r}, not a number")
    try:
        return LoraSettings(
            r=int(config["r"]),
            alpha=float(config.get("lora_alpha", config["r"])),
            use_rslora=bool(config.get("use_rslora", False)),
            fan_in_fan_out=bool(config.get("fan_in_fan_out", False)),
            rank_pattern=_check_patterns(ref, "rank_pattern", config.get("rank_pattern"), int),
            alpha_pattern=_check_patterns(ref, "alpha_pattern", config.get("alpha_pattern"), float),
        )
    except (KeyError, TypeError, ValueError, OverflowError) as exc:
        raise MergeError(
            f"LoRA adapter {ref!r}: {ADAPTER_CONFIG} has no usable 'r'/'lora_alpha' ({exc})"
        ) from None


def _split_keys(
    ref: str, tensors: dict[str, TensorInfo]
) -> tuple[dict[str, LoraFactors], dict[str, TensorInfo]]:
    """Group PEFT keys into factor pairs per module and whole tensors (modules_to_save, saved embeddings)."""
    parts: dict[str, dict[str, TensorInfo]] = {}
    embedding: dict[str, bool] = {}
    full: dict[str, TensorInfo] = {}
    for key, info in tensors.items():
        if not key.startswith(PEFT_PREFIX):
            raise MergeError(
                f"LoRA adapter {ref!r}: tensor {key!r} does not start with {PEFT_PREFIX!r}; not a PEFT adapter"
            )
        rest = key[len(PEFT_PREFIX) :]
        for suffix, (factor, is_embed) in FACTOR_SUFFIXES.items():
            if rest.endswith(suffix):
                module = rest[: -len(suffix)]
                parts.setdefault(module, {})[factor] = info
                embedding[module] = is_embed
                break
        else:
            if ".lora_" in rest or "lora_magnitude_vector" in rest:
                raise MergeError(
                    f"LoRA adapter {ref!r}: tensor {key!r} is of a LoRA variant that is not supported"
                )
            full[rest.replace(".base_layer.", ".")] = info
    factors: dict[str, LoraFactors] = {}
    for module, pair in parts.items():
        if set(pair) != {"A", "B"}:
            missing = "lora_B" if "A" in pair else "lora_A"
            raise MergeError(f"LoRA adapter {ref!r}: module {module!r} has no {missing} tensor")
        a, b = pair["A"], pair["B"]
        if len(a.shape) != 2 or len(b.shape) != 2:
            raise MergeError(
                f"LoRA adapter {ref!r}: module {module!r} has {len(a.shape)}-D factors; only LoRA on linear "
                "and embedding layers is supported"
            )
        factors[module] = LoraFactors(module, a, b, embedding[module])
    return factors, full


def _check_rank(ref: str, f: LoraFactors, settings: LoraSettings) -> None:
    r_a, r_b = f.a.shape[0], f.b.shape[1]
    if r_a != r_b:
        raise MergeError(
            f"LoRA adapter {ref!r}: module {f.module!r} has lora_A of rank {r_a} but lora_B of rank {r_b}"
        )
    expected = settings.rank(f.module)
    if expected != r_a:
        raise MergeError(
            f"LoRA adapter {ref!r}: module {f.module!r} has rank {r_a} but {ADAPTER_CONFIG} says r={expected} "
            "(r / rank_pattern); the scale alpha/r would be wrong"
        )
