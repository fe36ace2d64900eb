"""Tensor dtypes by their safetensors codes, without importing torch.

Planning a merge (headers, shapes, dtypes, shards) needs only names and sizes; torch is imported when a
tensor is first computed, and not at all when the native backend merges. ``torch_dtype(code)`` gives the
torch dtype of a code, ``code_of`` the code of a torch dtype, dtype name or code.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from mergesmith.core.errors import ConfigError

if TYPE_CHECKING:
    import torch

# safetensors code -> (torch / numpy-style name, bytes per element)
CODES: dict[str, tuple[str, int]] = {
    "F64": ("float64", 8),
    "F32": ("float32", 4),
    "F16": ("float16", 2),
    "BF16": ("bfloat16", 2),
    "I64": ("int64", 8),
    "I32": ("int32", 4),
    "I16": ("int16", 2),
    "I8": ("int8", 1),
    "U8": ("uint8", 1),
    "BOOL": ("bool", 1),
    "F8_E4M3": ("float8_e4m3fn", 1),
    "F8_E5M2": ("float8_e5m2", 1),
}
FLOAT_CODES = frozenset({"F64", "F32", "F16", "BF16"})
_BY_NAME = {name: code for code, (name, _) in CODES.items()}


def itemsize(code: str) -> int:
    return CODES[code][1]


def name_of(code: str) -> str:
    """'BF16' -> 'bfloat16' (the name config files and torch use)."""
    return CODES[code][0]


def code_of(dtype: Any) -> str:
    """The safetensors code of a code ('BF16'), a name ('bfloat16') or a torch dtype (torch.bfloat16)."""
    if isinstance(dtype, str) and dtype in CODES:
        return dtype
    name = str(dtype).removeprefix("torch.")
    try:
        return _BY_NAME[name]
    except KeyError:
        raise ValueError(f"no safetensors dtype for {dtype!r}") from None


def check_code(code: Any, name: str) -> None:
    """Fail loudly when a tensor description is given anything but a safetensors code (a torch dtype
    must be converted where it leaves torch: ``code_of``)."""
    if not isinstance(code, str) or code not in CODES:
        raise TypeError(f"tensor {name!r}: dtype {code!r} is not a safetensors code (use dtypes.code_of)")


def torch_dtype(code: str):
    """The torch dtype of a code (imports torch)."""
    import torch

    return getattr(torch, name_of(code))


DTYPE_NAMES: dict[str, str] = {  # config spelling -> safetensors code
    "float32": "F32",
    "fp32": "F32",
    "float16": "F16",
    "fp16": "F16",
    "half": "F16",
    "bfloat16": "BF16",
    "bf16": "BF16",
    "float64": "F64",
    "fp64": "F64",
}


def parse_code(name: str | None, key: str) -> str | None:
    """A config's dtype name -> its safetensors code (None stays None)."""
    if name is None:
        return None
    cleaned = name.removeprefix("torch.").lower()
    try:
        return DTYPE_NAMES[cleaned]
    except KeyError:
        raise ConfigError(
            f"{key}: unknown dtype {name!r}; use float32, float16, bfloat16 or float64"
        ) from None


def parse_dtype(name: str | None, key: str) -> torch.dtype | None:
    """A config's dtype name -> torch dtype (imports torch)."""
    code = parse_code(name, key)
    return None if code is None else torch_dtype(code)


def dtype_name(dtype) -> str:
    """'bfloat16' for torch.bfloat16 or 'BF16'."""
    return name_of(code_of(dtype))
