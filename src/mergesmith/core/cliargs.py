"""argparse types shared by the sub-commands (cheap to import: no torch)."""

from __future__ import annotations

import argparse

from mergesmith.core.errors import MergeError


def positive_int(text: str) -> int:
    """argparse ``type=`` for counts that must be at least 1 (``--workers``): 0 and negatives are refused
    at parse time instead of meaning something surprising later."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def check_workers(workers: int | None) -> int | None:
    """The API side of ``--workers``: None means "choose for me"; anything else must be at least 1."""
    if workers is None:
        return None
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise MergeError(f"--workers must be a whole number of at least 1, got {workers!r}")
    return workers
