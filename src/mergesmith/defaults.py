"""Defaults shared by the CLI and the library (kept free of heavy imports)."""

DEFAULT_SHARD_SIZE = "5G"
