"""A checkpoint on disk: config.json, a tensor index over safetensors shards, and lazy tensor reads.

Tensors are read with ``pread`` into freshly allocated buffers rather than through ``mmap``: the bytes a
merge touches then count once, in memory we own and free, and a row range of a big tensor (an embedding)
can be read without touching the rest of it.
"""

from __future__ import annotations

import json
import math
import os
import struct
import threading
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from mergesmith import dtypes
from mergesmith.errors import MergeError

if TYPE_CHECKING:
    import torch

MAX_HEADER_BYTES = 100 * 1024 * 1024
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)


def __getattr__(name: str) -> Any:
    """The torch-dtype tables, built on first use (importing torch): SAFETENSORS_DTYPES (code -> dtype),
    DTYPE_CODES (dtype -> code) and FLOAT_DTYPES."""
    if name == "SAFETENSORS_DTYPES":
        return {code: dtypes.torch_dtype(code) for code in dtypes.CODES}
    if name == "DTYPE_CODES":
        return {dtypes.torch_dtype(code): code for code in dtypes.CODES}
    if name == "FLOAT_DTYPES":
        return {dtypes.torch_dtype(code) for code in dtypes.FLOAT_CODES}
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor's bytes live: file, absolute byte offset, dtype and shape.

    ``code`` is the safetensors dtype code ('BF16'); a torch dtype given in its place is converted.
    ``dtype`` is the torch dtype (imports torch)."""

    name: str
    code: str
    shape: tuple[int, ...]
    file: Path
    offset: int

    def __post_init__(self) -> None:
        object.__setattr__(self, "code", dtypes.code_of(self.code))

    @property
    def dtype(self) -> torch.dtype:
        return dtypes.torch_dtype(self.code)

    @property
    def itemsize(self) -> int:
        return dtypes.itemsize(self.code)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * self.itemsize

    @property
    def row_bytes(self) -> int:
        return math.prod(self.shape[1:]) * self.itemsize if self.shape else self.nbytes


def read_safetensors_header(path: Path) -> dict[str, TensorInfo]:
    """Parse a safetensors file's header and check it against the file size (catches truncation)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise MergeError(f"{path}: not a safetensors file (shorter than its 8-byte header length)")
            (header_len,) = struct.unpack("<Q", raw)
            if header_len > MAX_HEADER_BYTES or 8 + header_len > size:
                raise MergeError(f"{path}: corrupt safetensors header (declared length {header_len} bytes)")
            header = json.loads(f.read(header_len))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MergeError(
            f"{path}: cannot read safetensors header ({exc.__class__.__name__}: {exc})"
        ) from None
    if not isinstance(header, dict):
        raise MergeError(f"{path}: corrupt safetensors header (not a JSON object)")
    data_start = 8 + header_len
    out: dict[str, TensorInfo] = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        try:
            code = meta["dtype"]
            if code not in dtypes.CODES:
                raise KeyError(code)
            shape = tuple(int(d) for d in meta["shape"])
            begin, end = (int(x) for x in meta["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise MergeError(f"{path}: corrupt safetensors header entry for tensor {name!r}") from None
        info = TensorInfo(name, code, shape, path, data_start + begin)
        if end - begin != info.nbytes:
            raise MergeError(
                f"{path}: tensor {name!r} has {end - begin} bytes but its shape needs {info.nbytes}"
            )
        if data_start + end > size:
            raise MergeError(
                f"{path}: file is truncated ({size} bytes, tensor {name!r} ends at byte {data_start + end}); "
                "download or copy it again"
            )
        out[name] = info
    return out


def _pread_into(fd: int, view: memoryview, offset: int, path: Path) -> None:
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], offset + done)
        if n <= 0:
            raise MergeError(f"{path}: unexpected end of file while reading tensor data")
        done += n


# numpy dtype that holds each code's bytes (bf16 and float8 as raw unsigned integers)
NUMPY_STORAGE = {
    "F64": "<f8",
    "F32": "<f4",
    "F16": "<f2",
    "BF16": "<u2",
    "I64": "<i8",
    "I32": "<i4",
    "I16": "<i2",
    "I8": "i1",
    "U8": "u1",
    "BOOL": "?",
    "F8_E4M3": "u1",
    "F8_E5M2": "u1",
}


def read_tensor(info: TensorInfo, rows: tuple[int, int] | None = None, fd: int | None = None) -> torch.Tensor:
    """Read a tensor (or rows [r0, r1) of it) in its stored dtype into memory we own."""
    import torch

    raw = read_array(info, rows, fd, storage=False)
    return torch.from_numpy(raw).view(info.dtype).reshape(_shape(info, rows))


def _shape(info: TensorInfo, rows: tuple[int, int] | None) -> tuple[int, ...]:
    return info.shape if rows is None else (rows[1] - rows[0], *info.shape[1:])


def read_array(
    info: TensorInfo, rows: tuple[int, int] | None = None, fd: int | None = None, storage: bool = True
) -> np.ndarray:
    """Read a tensor (or rows [r0, r1) of it) into a numpy array we own: with ``storage``, in the numpy
    dtype that holds its bytes (NUMPY_STORAGE: bf16 as uint16) and its shape; otherwise flat bytes."""
    if rows is None:
        offset, nbytes = info.offset, info.nbytes
    else:
        offset = info.offset + rows[0] * info.row_bytes
        nbytes = (rows[1] - rows[0]) * info.row_bytes
    buf = np.empty(nbytes, dtype=np.uint8)
    if nbytes:
        own = fd is None
        if own:
            fd = os.open(info.file, os.O_RDONLY)
        try:
            _pread_into(fd, memoryview(buf), offset, info.file)
        finally:
            if own:
                os.close(fd)
    return buf.view(NUMPY_STORAGE[info.code]).reshape(_shape(info, rows)) if storage else buf


def parse_model_ref(ref: str) -> tuple[str, str | None]:
    """Split ``path_or_repo@revision``; a local path that exists wins over the ``@`` reading."""
    if "@" in ref and not Path(ref).exists():
        name, _, revision = ref.rpartition("@")
        return name, revision or None
    return ref, None


def resolve_model_dir(ref: str) -> Path:
    """A local folder as is; anything else through huggingface_hub (cache first, then download)."""
    name, revision = parse_model_ref(ref)
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise MergeError(f"model {ref!r}: is a file, expected a model folder with config.json")
    looks_local = name.startswith((".", "/", "~")) or name.count("/") != 1
    if looks_local:
        raise MergeError(f"model {ref!r}: folder not found")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:  # pragma: no cover - huggingface_hub is a dependency
        raise MergeError(f"model {ref!r}: not a local folder and huggingface_hub is not installed") from None
    patterns = ["*.json", "*.safetensors", "tokenizer.model", "*.txt", "*.jinja"]
    try:
        return Path(
            snapshot_download(name, revision=revision, allow_patterns=patterns, local_files_only=True)
        )
    except Exception:
        pass
    try:
        return Path(snapshot_download(name, revision=revision, allow_patterns=patterns))
    except Exception as exc:
        raise MergeError(
            f"model {ref!r}: not a local folder, and fetching it from the Hugging Face Hub failed "
            f"({exc.__class__.__name__}); check the path, or download it while online"
        ) from None


def _is_packed_bitnet(config: dict) -> bool:
    qc = config.get("quantization_config")
    return (
        isinstance(qc, dict)
        and qc.get("quant_method") == "bitnet"
        and qc.get("quantization_mode", "offline") == "offline"
    )


class ModelSource:
    """One input model: its config.json and an index from tensor name to where its bytes are."""

    def __init__(self, ref: str, path: Path):
        self.ref = ref
        self.path = path
        self._lock = threading.Lock()
        self._fds: dict[Path, int] = {}

    @classmethod
    def open(cls, ref: str) -> ModelSource:
        """Open a model folder (or hub reference); a packed BitNet checkpoint (``quant_method: bitnet``,
        offline) opens as :class:`mergesmith.bitnet.source.BitnetModelSource`, i.e. as float weights."""
        src = cls(ref, resolve_model_dir(ref))
        if cls is ModelSource and _is_packed_bitnet(src.config):
            from mergesmith.bitnet.source import BitnetModelSource

            src = BitnetModelSource(ref, src.path)
        _ = src.config, src.tensors  # fail now, with the model named, not in the middle of a merge
        return src

    def __repr__(self) -> str:
        return f"ModelSource({self.ref!r})"

    @cached_property
    def config(self) -> dict:
        cfg_path = self.path / "config.json"
        if not cfg_path.is_file():
            raise MergeError(f"model {self.ref!r}: no config.json in {self.path}")
        try:
            cfg = json.loads(cfg_path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise MergeError(f"model {self.ref!r}: config.json is not valid JSON ({exc})") from None
        if not isinstance(cfg, dict):
            raise MergeError(f"model {self.ref!r}: config.json is not a JSON object")
        return cfg

    @cached_property
    def tensors(self) -> dict[str, TensorInfo]:
        index = self.path / "model.safetensors.index.json"
        single = self.path / "model.safetensors"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (OSError, json.JSONDecodeError, KeyError, TypeError) as exc:
                raise MergeError(
                    f"model {self.ref!r}: unreadable model.safetensors.index.json ({exc})"
                ) from None
            files = sorted(set(weight_map.values()))
        elif single.is_file():
            files, weight_map = ["model.safetensors"], None
        else:
            files = sorted(p.name for p in self.path.glob("*.safetensors"))
            weight_map = None
            if not files:
                has_bin = any(self.path.glob("*.bin")) or any(self.path.glob("*.pt"))
                hint = (
                    " (only pickle .bin/.pt weights found: convert them to safetensors first)"
                    if has_bin
                    else ""
                )
                raise MergeError(f"model {self.ref!r}: no safetensors weights in {self.path}{hint}")
        out: dict[str, TensorInfo] = {}
        for fname in files:
            fpath = self.path / fname
            if not fpath.is_file():
                raise MergeError(f"model {self.ref!r}: shard {fname} named in the index is missing")
            for name, info in read_safetensors_header(fpath).items():
                if weight_map is None or weight_map.get(name) == fname:
                    out[name] = info
        if weight_map is not None:
            missing = sorted(set(weight_map) - set(out))
            if missing:
                raise MergeError(
                    f"model {self.ref!r}: tensor {missing[0]!r} is in the index but not in its shard"
                )
        return out

    def _fd(self, file: Path) -> int:
        with self._lock:
            fd = self._fds.get(file)
            if fd is None:
                fd = self._fds[file] = os.open(file, os.O_RDONLY)
            return fd

    def _info(self, name: str) -> TensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise MergeError(f"model {self.ref!r}: has no tensor {name!r}") from None

    def read(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """Read tensor ``name`` (rows [r0, r1) if given) in its stored dtype."""
        info = self._info(name)
        return read_tensor(info, rows, self._fd(info.file))

    def read_array(self, name: str, rows: tuple[int, int] | None = None) -> np.ndarray:
        """Tensor ``name`` (rows [r0, r1) if given) as a numpy array of its stored bytes (NUMPY_STORAGE)."""
        info = self._info(name)
        return read_array(info, rows, self._fd(info.file))

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()

    def tokenizer_files(self) -> list[Path]:
        return [self.path / f for f in TOKENIZER_FILES if (self.path / f).is_file()]
