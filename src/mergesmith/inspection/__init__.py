"""Inspection: what a merge will do to its models, before it runs, and what it did, after.

``inspect_models`` returns every figure as a JSON-ready dict (docs/inspect.md); ``mergesmith inspect`` is
its command-line face. The name is imported on first use (it loads numba and numpy).
"""

from mergesmith.core.lazy import lazy_exports

__all__ = ["inspect_models"]
__getattr__ = lazy_exports(__name__, {"inspect_models": "mergesmith.inspection.analyse"})
