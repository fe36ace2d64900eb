"""mergesmith: merge fine-tuned language models tensor by tensor on a CPU."""

from mergesmith.core.defaults import VERSION as __version__
from mergesmith.core.errors import ConfigError, MergeError

__all__ = ["ConfigError", "MergeError", "__version__", "make_plan", "merge"]


def merge(config, out_dir, **options):
    """Merge models as described by ``config`` (a path, a YAML string or a dict) into ``out_dir``.

    Options are those of ``mergesmith merge`` (``overwrite``, ``force``, ``random_seed``, ``out_shard_size``, ...).
    """
    from mergesmith.pipeline.api import merge as _merge

    return _merge(config, out_dir, **options)


def make_plan(config, **options):
    """The merge plan of ``config`` (every output tensor, its inputs, method and parameters), checked but
    not run; what ``mergesmith plan`` prints. Options: ``allow_crimes``, ``strict``, ``mergekit_compat``, ``per_expert``."""
    from mergesmith.pipeline.api import make_plan as _make_plan

    return _make_plan(config, **options)
