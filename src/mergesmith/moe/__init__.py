"""Building a sparse mixture of experts from dense fine-tunes; router initialisation without training.

``build_moe(config, out_dir)`` is the Python API of ``mergesmith moe``; see docs/moe.md. The names are
imported on first use, so that registering the command (``mergesmith --help``) does not load torch.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_WHERE = {
    "MoEConfig": "mergesmith.moe.config",
    "load_moe_config": "mergesmith.moe.config",
    "MoEResult": "mergesmith.moe.build",
    "build_moe": "mergesmith.moe.build",
    "make_moe_plan": "mergesmith.moe.build",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'mergesmith.moe' has no attribute {name!r}")
    return getattr(import_module(_WHERE[name]), name)
