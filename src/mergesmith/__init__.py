"""mergesmith: merge fine-tuned language models tensor by tensor on a CPU."""

__version__ = "0.1.0"

from mergesmith.errors import ConfigError, MergeError  # noqa: E402

__all__ = ["ConfigError", "MergeError", "__version__", "merge"]


def merge(config, out_dir, **options):
    """Merge models as described by ``config`` (a path, a YAML string or a dict) into ``out_dir``.

    Options are those of ``mergesmith merge`` (``overwrite``, ``force``, ``random_seed``, ``out_shard_size``, ...).
    """
    from mergesmith.api import merge as _merge

    return _merge(config, out_dir, **options)
