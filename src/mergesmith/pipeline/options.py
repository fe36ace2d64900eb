"""The options of a merge, as one object carried from the command line (or ``mergesmith.merge``'s keywords)
through the stages of a multi-stage file to the executor.

Every field says whether it can change the bytes a merge writes (``output=True``): those, normalised by
their ``identity`` function, make up the options part of a stage's identity (:func:`output_identity`,
used by stages.py to decide whether a stage folder is up to date). A new option must say which kind it is
(tests/test_options.py checks that every field does), so it cannot silently be left out of the identity.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from mergesmith.core.cliargs import check_workers
from mergesmith.core.defaults import DEFAULT_SHARD_SIZE, OUT_FORMATS
from mergesmith.core.devices import check_device
from mergesmith.core.errors import MergeError
from mergesmith.core.sizes import parse_size

OMIT = object()
"""What an ``identity`` function returns for a value that must not appear in the identity (an option's
off state, when the option was added after stage identities existed: leaving it out keeps them)."""


def _same(value: Any) -> Any:
    return value


def output(default: Any, identity: Callable[[Any], Any] = _same) -> Any:
    """A field that can change the output's bytes; ``identity`` gives the value hashed into a stage's
    identity (or :data:`OMIT`)."""
    return field(default=default, metadata={"output": True, "identity": identity})


def run_only(default: Any) -> Any:
    """A field that changes how a merge runs or where it may write, never the bytes it writes."""
    return field(default=default, metadata={"output": False})


@dataclass(frozen=True)
class MergeOptions:
    """Everything about a merge but its config and output folder (see ``mergesmith merge --help``)."""

    # what is written
    random_seed: int | None = output(None, lambda v: v or 0)
    out_shard_size: str | int = output(DEFAULT_SHARD_SIZE, parse_size)
    copy_tokenizer: bool = output(True)
    write_model_card: bool = output(True)
    allow_crimes: bool = output(False, lambda v: True if v else OMIT)  # copies tensors instead of refusing
    out_format: str = output("safetensors", lambda v: OMIT if v == "safetensors" else v)
    # mergekit's result where a mergesmith extension of a method (model_stock's weights) would change it
    mergekit_compat: bool = output(False, lambda v: True if v else OMIT)
    # per-expert MoE tensors merged each on its own, not as the fused tensor mergekit merges (TIES's top-k)
    per_expert: bool = output(False, lambda v: True if v else OMIT)
    # how it runs: the backends and any worker count, memory limit or chunking write the same bytes
    memory_limit: str | int | None = run_only(None)
    workers: int | None = run_only(None)
    device: str = run_only("cpu")
    backend: str = run_only("auto")
    strict: bool = run_only(False)  # warnings become errors: a merge runs or does not
    quiet: bool = run_only(False)
    # where it may write
    overwrite: bool = run_only(False)
    force: bool = run_only(False)
    intermediate_dir: str | Path | None = run_only(None)

    def check(self) -> None:
        """The checks that cost nothing, made before anything is read (a typo must not cost a finished
        first stage)."""
        check_device(self.device)
        check_workers(self.workers)
        if self.out_format not in OUT_FORMATS:
            raise MergeError(
                f"unknown output format {self.out_format!r}; use one of: {', '.join(OUT_FORMATS)}"
            )


def output_identity(options: MergeOptions) -> dict[str, Any]:
    """The options part of a stage's identity: every ``output`` field, normalised."""
    out = {}
    for f in fields(options):
        if f.metadata["output"]:
            value = f.metadata["identity"](getattr(options, f.name))
            if value is not OMIT:
                out[f.name] = value
    return out
