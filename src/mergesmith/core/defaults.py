"""Defaults shared by the CLI and the library (kept free of heavy imports)."""

DEFAULT_SHARD_SIZE = "5G"

OUT_FORMATS = ("safetensors", "bitnet")
"""``merge --out-format``: plain safetensors, or BitNet b1.58 (ternary linear weights, packed)."""
