"""Evolutionary search of merge recipes (``mergesmith search``): candidates merged in memory through the
pipeline, scored with :mod:`mergesmith.eval`, journalled so that a search resumes, in parallel on worker
processes or Ray. A workflow that composes features (layer 4 of docs/design.md)."""

from mergesmith.core.lazy import lazy_exports

__all__ = ["SearchConfig", "SearchResult", "read_search_config", "search"]
__getattr__ = lazy_exports(
    __name__,
    {
        "SearchConfig": "mergesmith.search.config",
        "read_search_config": "mergesmith.search.config",
        "SearchResult": "mergesmith.search.run",
        "search": "mergesmith.search.run",
    },
)
