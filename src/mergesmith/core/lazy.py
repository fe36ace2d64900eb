"""The one pattern for a package whose public names are imported on first use.

A feature package (``mergesmith.moe``, ``mergesmith.eval``, ...) names its Python API in its
``__init__.py``, but the modules behind it load torch or transformers (seconds), which registering the
command-line parsers (``mergesmith --help``) and ``mergesmith merge`` never need:

    __getattr__ = lazy_exports(__name__, {"build_moe": "mergesmith.moe.build", ...})
    __all__ = [...]
"""

from __future__ import annotations

from collections.abc import Callable
from importlib import import_module
from typing import Any


def lazy_exports(package: str, where: dict[str, str]) -> Callable[[str], Any]:
    """A module ``__getattr__`` that imports ``where[name]`` when ``package.name`` is first read."""

    def __getattr__(name: str) -> Any:
        if name not in where:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(import_module(where[name]), name)

    return __getattr__
