"""argparse types shared by the sub-commands (cheap to import: no torch)."""

from __future__ import annotations

import argparse
from dataclasses import fields
from typing import Any, TypeVar

from mergesmith.core.errors import MergeError

T = TypeVar("T")


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


#: Seeds the optimisers take (numpy's, cmaes', optuna's): 0 to 2**32 - 1.
SEED_RANGE = (0, 2**32 - 1)


def check_seed(seed: object, flag: str = "--seed") -> int:
    """A seed the optimisers accept, or one line naming the range."""
    lo, hi = SEED_RANGE
    if isinstance(seed, bool) or not isinstance(seed, int) or not lo <= seed <= hi:
        raise MergeError(f"{flag} must be a whole number from {lo} to {hi}, got {seed!r}")
    return seed


def seed_int(text: str) -> int:
    """argparse ``type=`` for ``--seed``: a whole number in SEED_RANGE."""
    try:
        return check_seed(int(text))
    except (ValueError, MergeError):
        raise argparse.ArgumentTypeError(
            f"expected a whole number from {SEED_RANGE[0]} to {SEED_RANGE[1]}, got {text!r}"
        ) from None


def check_workers(workers: int | None) -> int | None:
    """The API side of ``--workers``: None means "choose for me"; anything else must be at least 1."""
    if workers is None:
        return None
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise MergeError(f"--workers must be a whole number of at least 1, got {workers!r}")
    return workers


# The flags that mean the same in every command, added by one function each.


def add_verbosity(
    p: argparse.ArgumentParser, quiet: str, verbose: str = "more detail: -v logs info lines"
) -> None:
    """``-q/--quiet`` (``quiet`` says what it leaves out) and ``-v/--verbose`` (log lines at info level;
    ``verbose`` says which)."""
    p.add_argument("--quiet", "-q", action="store_true", help=quiet)
    p.add_argument("-v", "--verbose", action="count", default=0, help=verbose)


def add_output_folder(p: argparse.ArgumentParser, what: str = "OUT_DIR") -> None:
    """``--overwrite`` and ``--force`` for a command that writes an output folder (see
    :class:`mergesmith.core.write.OutputFolder`)."""
    p.add_argument("--overwrite", action="store_true", help=f"replace {what} if it exists and holds a model")
    p.add_argument(
        "--force",
        action="store_true",
        help="with --overwrite, also replace an OUT_DIR that does not hold a model",
    )


def add_workers(p: argparse.ArgumentParser, what: str) -> None:
    """``--workers N``; left out, the command chooses (:func:`mergesmith.core.devices.default_workers`)."""
    p.add_argument(
        "--workers", type=positive_int, metavar="N", help=f"{what} at once, at least 1 (default: 2-3)"
    )


def add_device(p: argparse.ArgumentParser, what: str) -> None:
    """``--device``, checked by :func:`mergesmith.core.devices.check_device` when the command runs."""
    p.add_argument("--device", default="cpu", help=f"{what}: cpu (default), cuda or cuda:N")


def options_from_args(cls: type[T], args: argparse.Namespace, **given: Any) -> T:
    """An options dataclass from parsed flags: each field from the flag of the same name where the
    command has one (else the field's default), ``given`` for fields whose flag reads differently
    (``--no-model-card`` -> ``write_model_card``)."""
    names = {f.name for f in fields(cls)}  # type: ignore[arg-type]
    found = {name: getattr(args, name) for name in names if hasattr(args, name) and name not in given}
    return cls(**found, **given)
