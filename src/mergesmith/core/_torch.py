"""``torch``, imported on first use: modules on the path of a merge refer to it through this name, so
that planning, and merges that the native backend runs, never pay torch's import (about a second)."""

from __future__ import annotations

import importlib
from typing import Any

_module: Any = None


class _LazyTorch:
    __slots__ = ()

    def __getattr__(self, name: str) -> Any:
        global _module
        if _module is None:
            _module = importlib.import_module("torch")
        return getattr(_module, name)

    def __repr__(self) -> str:
        return "<torch, imported on first use>"


torch: Any = _LazyTorch()
