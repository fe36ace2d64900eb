"""Writing the output folder: pre-laid-out safetensors shards, the index, config, tokenizer and card.

The plan knows every output tensor's name, dtype and shape before any data exists, so the shards'
headers are written first and each tensor (or row chunk of a tensor) is written straight to its final
offset with ``pwrite`` by whichever thread computed it. No shard is ever buffered in memory.

Everything goes to a temporary folder beside the destination, renamed into place when complete.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mergesmith import dtypes
from mergesmith.errors import MergeError
from mergesmith.sizes import parse_size  # noqa: F401  (re-exported: older imports)

INDEX_NAME = "model.safetensors.index.json"


@dataclass(frozen=True)
class TensorSpec:
    """An output tensor's name, dtype (a safetensors code; a torch dtype is converted) and shape."""

    name: str
    code: str
    shape: tuple[int, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "code", dtypes.code_of(self.code))

    @property
    def dtype(self):
        """The torch dtype (imports torch)."""
        return dtypes.torch_dtype(self.code)

    @property
    def nbytes(self) -> int:
        n = dtypes.itemsize(self.code)
        for d in self.shape:
            n *= d
        return n


class ShardedWriter:
    """Safetensors shards laid out up front; tensors are written by name at their final offsets."""

    def __init__(self, folder: Path, specs: Sequence[TensorSpec], max_shard_bytes: int):
        self.folder = folder
        groups: list[list[TensorSpec]] = [[]]
        size = 0
        for spec in specs:
            if groups[-1] and size + spec.nbytes > max_shard_bytes:
                groups.append([])
                size = 0
            groups[-1].append(spec)
            size += spec.nbytes
        n = len(groups)
        self.files = [
            "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)
        ]
        self.where: dict[str, tuple[int, int, int]] = {}  # name -> (file index, absolute offset, nbytes)
        self.fds: list[int] = []
        self.total_size = 0
        self.pending: dict[str, int] = {}
        for fi, (fname, group) in enumerate(zip(self.files, groups)):
            header: dict = {"__metadata__": {"format": "pt"}}
            offset = 0
            for spec in group:
                if spec.name in self.where or spec.name in header:
                    raise MergeError(f"output tensor {spec.name!r} is planned twice")
                header[spec.name] = {
                    "dtype": spec.code,
                    "shape": list(spec.shape),
                    "data_offsets": [offset, offset + spec.nbytes],
                }
                offset += spec.nbytes
            raw = json.dumps(header, separators=(",", ":")).encode()
            raw += b" " * (-len(raw) % 8)
            data_start = 8 + len(raw)
            fd = os.open(folder / fname, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
            self.fds.append(fd)
            os.pwrite(fd, len(raw).to_bytes(8, "little") + raw, 0)
            _preallocate(fd, data_start + offset)
            for spec in group:
                begin = header[spec.name]["data_offsets"][0]
                self.where[spec.name] = (fi, data_start + begin, spec.nbytes)
                self.pending[spec.name] = spec.nbytes
            self.total_size += offset

    def write(self, name: str, tensor: Any, byte_offset: int = 0) -> None:
        """Write ``tensor`` (a torch tensor or numpy array, already in the output dtype) at
        ``byte_offset`` inside tensor ``name``."""
        fi, start, nbytes = self.where[name]
        if isinstance(tensor, np.ndarray):
            data = np.ascontiguousarray(tensor).reshape(-1).view(np.uint8)
        else:
            import torch

            data = tensor.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy()
        if byte_offset + data.nbytes > nbytes:
            raise MergeError(f"internal error: write past the end of tensor {name!r}")
        view = memoryview(data)
        pos = start + byte_offset
        while len(view):
            n = os.pwrite(self.fds[fi], view, pos)
            view = view[n:]
            pos += n
        self.pending[name] -= data.nbytes

    def finish(self) -> None:
        """Check every byte was written, close the files and write the index for sharded output."""
        missing = [n for n, left in self.pending.items() if left != 0]
        if missing:
            raise MergeError(f"internal error: tensor {missing[0]!r} was not completely written")
        self.close()
        if len(self.files) > 1:
            weight_map = {name: self.files[fi] for name, (fi, _, _) in self.where.items()}
            index = {"metadata": {"total_size": self.total_size}, "weight_map": weight_map}
            (self.folder / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")

    def close(self) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds = []


def _preallocate(fd: int, size: int) -> None:
    """Reserve the file's blocks up front: writes into allocated space are several times faster than
    into a sparse file, and a full disk fails here, before any merging, rather than halfway."""
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise MergeError(
                f"not enough disk space for the output ({size / 1e9:.2f} GB in one shard)"
            ) from None
        os.ftruncate(fd, size)  # file systems without fallocate
    except AttributeError:  # platforms without posix_fallocate
        os.ftruncate(fd, size)


class OutputFolder:
    """A temporary folder beside ``dest`` that becomes ``dest`` on ``commit()`` and vanishes otherwise."""

    def __init__(self, dest: str | Path, overwrite: bool = False):
        self.dest = Path(dest).expanduser().absolute()
        self.overwrite = overwrite
        if self.dest.exists() and not overwrite:
            raise MergeError(f"output folder {self.dest} already exists; pass --overwrite to replace it")
        if self.dest.exists() and not self.dest.is_dir():
            raise MergeError(f"output path {self.dest} exists and is not a folder")
        parent = self.dest.parent
        try:
            parent.mkdir(parents=True, exist_ok=True)
            self.path = Path(tempfile.mkdtemp(prefix=f".{self.dest.name}.", suffix=".partial", dir=parent))
        except OSError as exc:
            raise MergeError(f"cannot create the output folder next to {self.dest}: {exc.strerror}") from None

    def __enter__(self) -> OutputFolder:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None or self.path.exists():
            shutil.rmtree(self.path, ignore_errors=True)

    def commit(self) -> Path:
        old = None
        if self.dest.exists():
            old = self.dest.parent / f".{self.dest.name}.old-{os.getpid()}"
            os.rename(self.dest, old)
        os.rename(self.path, self.dest)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return self.dest


def copy_files(files: Sequence[Path], folder: Path) -> None:
    for f in files:
        shutil.copyfile(f, folder / f.name)


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
