"""Defaults shared by the CLI and the library (kept free of heavy imports)."""

VERSION = "0.1.0"
"""The package's version (``mergesmith.__version__``); part of every stage's identity."""

DEFAULT_SHARD_SIZE = "5G"

OUT_FORMATS = ("safetensors", "bitnet")
"""``merge --out-format``: plain safetensors, or BitNet b1.58 (ternary linear weights, packed)."""
