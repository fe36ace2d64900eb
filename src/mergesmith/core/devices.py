"""``--device``: one check, shared by every command that runs maths somewhere and by the Python APIs.

It runs before anything is read or written, so a typo (``cdua``) or a GPU that is not there costs one
line and nothing else. torch is only imported for a CUDA device: ``plan`` and the native merge backend
stay free of it on the CPU.
"""

from __future__ import annotations

import os
import re

from mergesmith.core.errors import MergeError

VALID_DEVICES = "cpu, cuda, cuda:N (N = 0, 1, ...)"
_CUDA = re.compile(r"cuda(?::(\d+))?")


def check_device(device: str) -> str:
    """Return ``device`` (stripped, lower case) when it names a device this machine has; else raise
    MergeError with one line: the valid names for a typo, the reason for a missing GPU."""
    name = str(device).strip().lower()
    if name == "cpu":
        return name
    match = _CUDA.fullmatch(name)
    if match is None:
        raise MergeError(f"unknown device {device!r}; use one of: {VALID_DEVICES}")
    import torch

    if not torch.cuda.is_available():
        raise MergeError(f"--device {name} was given but no CUDA GPU is available to torch; use --device cpu")
    index = match.group(1)
    count = torch.cuda.device_count()
    if index is not None and int(index) >= count:
        raise MergeError(f"--device {name}: this machine has {count} CUDA GPU(s), numbered 0 to {count - 1}")
    return name


def default_workers() -> int:
    """Worker threads when ``--workers`` is not given: one per core, at most three (more rarely help:
    the reads and writes share one disk)."""
    return max(1, min(3, (os.cpu_count() or 2)))
