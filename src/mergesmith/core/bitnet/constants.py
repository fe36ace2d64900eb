"""Names the command line offers as choices, kept free of torch so that ``mergesmith --help`` is fast."""

from __future__ import annotations

LINEAR_CLASSES: tuple[str, ...] = ("autobitlinear", "bitlinear")
"""transformers' BitNet linear modules (``quantization_config.linear_class``)."""

DEFAULT_LINEAR_CLASS = "autobitlinear"

QTYPES: tuple[str, ...] = ("tq2_0", "tq1_0")
"""llama.cpp's ternary GGUF types."""

DEFAULT_INCLUDE: tuple[str, ...] = (r"(^|\.)layers\.\d+\.",)
"""Regexes (``re.search`` on the tensor name) of tensors that may be ternarised: decoder blocks."""
