"""A checkpoint on disk: config.json, a tensor index over safetensors shards, and lazy tensor reads.

Tensors are read with ``pread`` into freshly allocated buffers rather than through ``mmap``: the bytes a
merge touches then count once, in memory we own and free, and a row range of a big tensor (an embedding)
can be read without touching the rest of it.
"""

from __future__ import annotations

import json
import math
import os
import stat
import struct
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from mergesmith.core import dtypes
from mergesmith.core.diskread import FileReader, FileStamp, file_stamp, pread_into
from mergesmith.core.errors import MergeError

if TYPE_CHECKING:
    import torch

MAX_HEADER_BYTES = 100_000_000  # the safetensors library's own limit
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


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor's bytes live: file, absolute byte offset, dtype and shape.

    ``code`` is the safetensors dtype code ('BF16'); ``dtype`` is the torch dtype, for code that hands
    the tensor to torch (imports torch)."""

    name: str
    code: str
    shape: tuple[int, ...]
    file: Path
    offset: int

    def __post_init__(self) -> None:
        dtypes.check_code(self.code, self.name)

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


def _hub_blobs(root: str) -> str | None:
    """For a Hugging Face cache snapshot ``.../models--org--name/snapshots/<rev>``, that repository's
    ``blobs`` folder (where the snapshot's files are symlinks to); otherwise None."""
    snapshots = os.path.dirname(root)
    repo = os.path.dirname(snapshots)
    if os.path.basename(snapshots) == "snapshots" and os.path.basename(repo).startswith(
        ("models--", "datasets--")
    ):
        return os.path.join(repo, "blobs")
    return None


def _within(path: str, folder: str) -> bool:
    return os.path.commonpath([path, folder]) == folder


def model_file(folder: Path, entry: str, ref: str, kind: str = "model") -> Path:
    """The path of ``entry`` (a file name or relative path) inside the model or adapter folder ``folder``,
    checked before anything opens it.

    Refused with one line naming the ``kind`` ("model", "LoRA adapter"), ``ref`` and the entry: an absolute path, any ``..``, and a symlink
    (anywhere on the way) whose target lies outside the folder, except that a Hugging Face cache snapshot's
    files may point into the same repository's ``blobs/``. Only symlinks are followed here (``realpath``
    reads links, never files), so /etc/passwd or /proc/self/environ are never opened.
    """
    who = f"{kind} {ref!r}"
    if not isinstance(entry, str) or not entry or "\x00" in entry:
        raise MergeError(f"{who}: file entry {entry!r} is not a file name")
    parts = entry.replace("\\", "/").split("/")
    if entry.startswith(("/", "\\")) or os.path.isabs(entry) or ".." in parts:
        raise MergeError(f"{who}: file entry {entry!r} points outside the model folder; refusing to read it")
    path = folder / entry
    root = os.path.realpath(folder)
    real = os.path.realpath(path)
    blobs = _hub_blobs(root)
    if not (_within(real, root) or (blobs is not None and _within(real, blobs))):
        raise MergeError(
            f"{who}: {entry!r} is a symlink to {real}, outside the model folder; refusing to read it "
            "(copy the file into the folder if it is meant to be there)"
        )
    return path


def regular_file(path: Path) -> bool:
    """Whether ``path`` is a regular file (not a FIFO or device that would block or never end a read)."""
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        return False


def read_json_file(path: Path, what: str) -> Any:
    """Parse a JSON file; any failure (not UTF-8, invalid, nested too deeply, unreadable) is one line that
    starts with ``what`` (e.g. "model 'x': config.json")."""
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise MergeError(f"{what} is not UTF-8 text (byte {exc.start}); save it as UTF-8") from None
    except OSError as exc:
        raise MergeError(f"{what} cannot be read ({exc.strerror or exc.__class__.__name__})") from None
    try:
        return _strict_json_object(text)
    except _Reject as exc:
        raise MergeError(f"{what}: {exc}") from None


class _Reject(ValueError):
    """One reason a safetensors header is malformed (turned into a MergeError naming the file)."""


def _strict_json_object(text: str) -> Any:
    """``json.loads`` closer to serde_json: no NaN/Infinity literals; nesting too deep for Python's
    stack (RecursionError) is a parse error, not a crash."""

    def constant(name: str) -> Any:
        raise _Reject(f"invalid JSON literal {name}")

    try:
        value = json.loads(text, parse_constant=constant)
    except RecursionError:
        raise _Reject("JSON nested too deeply") from None
    except json.JSONDecodeError as exc:
        raise _Reject(f"not valid JSON ({exc.msg} at character {exc.pos})") from None
    return value


def _utf8_clean(s: str) -> bool:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate, from a JSON "\\ud800" escape
        return False
    return True


def _nonneg_int(x: Any) -> bool:
    # bool is an int subclass in Python; JSON true is not a dimension
    return type(x) is int and 0 <= x < 2**64


def _parse_header(header: Any, data_len: int, path: Path) -> dict[str, TensorInfo]:
    """Check a decoded header the way the safetensors library does: an object of objects, known
    dtypes, integer shapes and offsets, byte sizes that match, tensors packed back to back from the
    start of the data area to its end (no gap, no overlap, nothing after)."""
    if not isinstance(header, dict):
        raise _Reject("the header is not a JSON object")
    entries: list[tuple[int, int, str]] = []
    out: dict[str, TensorInfo] = {}
    for name, meta in header.items():
        if not _utf8_clean(name):
            raise _Reject("a tensor name is not valid UTF-8")
        if name == "__metadata__":
            if meta is not None and not (
                isinstance(meta, dict)
                and all(isinstance(v, str) and _utf8_clean(k) and _utf8_clean(v) for k, v in meta.items())
            ):
                raise _Reject("__metadata__ is not a mapping of strings to strings")
            continue
        if not isinstance(meta, dict):
            raise _Reject(f"entry of tensor {name!r} is not a JSON object")
        code, shape, offsets = meta.get("dtype"), meta.get("shape"), meta.get("data_offsets")
        if not isinstance(code, str) or code not in dtypes.CODES:
            raise _Reject(f"tensor {name!r} has unknown or unsupported dtype {code!r}")
        if not isinstance(shape, list) or not all(_nonneg_int(d) for d in shape):
            raise _Reject(f"tensor {name!r} has shape {shape!r}, not a list of non-negative integers")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_nonneg_int(x) for x in offsets)):
            raise _Reject(f"tensor {name!r} has data_offsets {offsets!r}, not two non-negative integers")
        begin, end = offsets
        if end < begin:
            raise _Reject(f"tensor {name!r} has data_offsets {offsets} that end before they begin")
        nbytes = math.prod(shape) * dtypes.itemsize(code)
        if end - begin != nbytes:
            raise _Reject(f"tensor {name!r} has {end - begin} bytes but its shape {shape} needs {nbytes}")
        entries.append((begin, end, name))
        out[name] = TensorInfo(name, code, tuple(shape), path, begin)  # offset: relative for now
    pos = 0
    for begin, end, name in sorted(entries):
        if begin != pos:
            what = "overlaps the tensor before it" if begin < pos else "leaves a gap before it"
            raise _Reject(f"tensor {name!r} at bytes {begin}..{end} {what} (expected it at byte {pos})")
        pos = end
    if pos != data_len:
        if pos > data_len:
            raise _Reject(
                f"the file is truncated: its tensors need {pos} bytes of data, it has {data_len}; "
                "download or copy it again"
            )
        raise _Reject(f"{data_len - pos} bytes after the last tensor are not described by the header")
    return out


def read_safetensors_header(path: Path, ref: str | None = None, kind: str = "model") -> dict[str, TensorInfo]:
    """Parse a safetensors file's header as strictly as the safetensors library does, checking every
    claim against the file's size before anything is allocated for it (catches truncation, and a header
    that claims a huge tensor costs nothing). ``kind`` and ``ref`` name the model in messages."""
    who = f"{kind} {ref!r}: {path.name}" if ref is not None else str(path)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            raw = f.read(8)
            if len(raw) < 8:
                raise _Reject("not a safetensors file (shorter than its 8-byte header length)")
            (header_len,) = struct.unpack("<Q", raw)
            if header_len > MAX_HEADER_BYTES or header_len > size - 8:
                raise _Reject(f"declared header length {header_len} does not fit the file ({size} bytes)")
            body = f.read(header_len)
        if len(body) < header_len:
            raise _Reject("the file is shorter than its header; download or copy it again")
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError:
            raise _Reject("the header is not UTF-8 text") from None
        header = _strict_json_object(text)
        # data_offsets count from the start of the data area, which follows the 8 + N header bytes
        infos = _parse_header(header, size - 8 - header_len, path)
    except _Reject as exc:
        raise MergeError(f"{who}: invalid safetensors header: {exc}") from None
    except OSError as exc:
        raise MergeError(f"{who}: cannot read it ({exc.strerror or exc.__class__.__name__})") from None
    data_start = 8 + header_len
    return {name: TensorInfo(name, i.code, i.shape, path, data_start + i.offset) for name, i in infos.items()}


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


def read_tensor(
    info: TensorInfo, rows: tuple[int, int] | None = None, fd: FileReader | None = None
) -> torch.Tensor:
    """Read a tensor (or rows [r0, r1) of it) in its stored dtype into memory we own."""
    import torch

    shape = _shape(info, rows)
    if math.prod(shape) == 0:  # torch cannot view an empty byte buffer as a wider dtype
        return torch.empty(shape, dtype=info.dtype)
    raw = read_array(info, rows, fd, storage=False)
    return torch.from_numpy(raw).view(info.dtype).reshape(shape)


def _shape(info: TensorInfo, rows: tuple[int, int] | None) -> tuple[int, ...]:
    return info.shape if rows is None else (rows[1] - rows[0], *info.shape[1:])


def read_array(
    info: TensorInfo,
    rows: tuple[int, int] | None = None,
    fd: FileReader | None = None,
    storage: bool = True,
    shared: bool = False,
) -> np.ndarray:
    """Read a tensor (or rows [r0, r1) of it) into a numpy array: with ``storage``, in the numpy dtype
    that holds its bytes (NUMPY_STORAGE: bf16 as uint16) and its shape; otherwise flat bytes. ``fd``: the
    file's :class:`FileReader` (it picks the page cache or a direct read, and serves held ranges); without
    one, the file is opened for this read. The array is ours to change, except with ``shared``, where
    bytes held by the reader may come as a read-only view."""
    if rows is None:
        offset, nbytes = info.offset, info.nbytes
    else:
        offset = info.offset + rows[0] * info.row_bytes
        nbytes = (rows[1] - rows[0]) * info.row_bytes
    if fd is not None:
        buf = fd.read(offset, nbytes, copy=not shared)
    else:
        buf = np.empty(nbytes, dtype=np.uint8)
        if nbytes:
            raw = os.open(info.file, os.O_RDONLY)
            try:
                pread_into(raw, memoryview(buf), offset, info.file)
            finally:
                os.close(raw)
    return buf.view(NUMPY_STORAGE[info.code]).reshape(_shape(info, rows)) if storage else buf


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def pickle_hint(folder: Path) -> str:
    """The one policy for pickled weights (they can run code when loaded): never loaded, by any command.
    Returns the message tail that says how to convert them, or "" when the folder has none."""
    try:
        pickled = sorted(p.name for p in folder.iterdir() if p.name.endswith(PICKLE_SUFFIXES))
    except OSError:
        return ""
    if not pickled:
        return ""
    return (
        f" (only pickle weights such as {pickled[0]} found: mergesmith never loads pickles, which can run "
        "code; convert them to safetensors first, see docs/security.md)"
    )


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


#: config.json sizes every architecture reads as whole numbers of at least 1 (when present and not null)
POSITIVE_INT_KEYS = (
    "num_hidden_layers",
    "hidden_size",
    "intermediate_size",
    "num_attention_heads",
    "num_key_value_heads",
    "vocab_size",
    "max_position_embeddings",
)


def _positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def check_config_values(config: dict, ref: str) -> None:
    """Refuse a config.json whose basic sizes are not whole positive numbers or whose
    ``tie_word_embeddings`` is not true/false (top level, and a multimodal model's ``text_config``):
    transformers cannot build such a model, and a merge would copy the config into its output. A list
    of them (one per layer, as Gemma 3n's intermediate_size) is a size too."""
    for where, cfg in (("", config), ("text_config.", config.get("text_config"))):
        if not isinstance(cfg, dict):
            continue
        for key in POSITIVE_INT_KEYS:
            value = cfg.get(key)
            per_layer = isinstance(value, list) and bool(value) and all(_positive_int(v) for v in value)
            if value is not None and not _positive_int(value) and not per_layer:
                raise MergeError(
                    f"model {ref!r}: config.json's {where}{key} is {json.dumps(value)}, not a whole number of "
                    "at least 1; fix config.json"
                )
        tie = cfg.get("tie_word_embeddings")
        if tie is not None and not isinstance(tie, bool):
            raise MergeError(
                f"model {ref!r}: config.json's {where}tie_word_embeddings is {json.dumps(tie)}, not true or "
                "false; fix config.json"
            )


def check_unchanged(sources: Iterable[ModelSource]) -> None:
    """Refuse to commit an output made from an input file that changed while it was read (another
    program wrote to it, or replaced it): the bytes read may mix two versions, a silently wrong result."""
    for source in sources:
        changed = source.changed_files()
        if changed:
            raise MergeError(
                f"model {source.ref!r}: {changed[0].name} changed while it was being read; nothing was "
                "written. Run again once nothing writes to the input models"
            )


class ModelSource:
    """One input model: its config.json and an index from tensor name to where its bytes are."""

    def __init__(self, ref: str, path: Path):
        self.ref = ref
        self.path = path
        self._lock = threading.Lock()
        self._fds: dict[Path, FileReader] = {}
        self._stamps: dict[Path, FileStamp] = {}  # each weights file as its header was read

    @classmethod
    def open(cls, ref: str) -> ModelSource:
        """Open a model folder (or hub reference) as this class. Which class a reference needs (plain,
        packed BitNet, with a LoRA adapter) is decided in one place: :func:`mergesmith.core.sources.open_source`."""
        return cls(ref, resolve_model_dir(ref)).checked()

    def checked(self) -> ModelSource:
        """This source after reading its config and headers: fails now, with the model named, not in the
        middle of a merge."""
        _ = self.config, self.tensors
        return self

    def __repr__(self) -> str:
        return f"ModelSource({self.ref!r})"

    def file(self, entry: str) -> Path:
        """``entry`` inside this model's folder, checked (see :func:`model_file`)."""
        return model_file(self.path, entry, self.ref)

    def optional_file(self, entry: str) -> Path | None:
        """``entry`` inside this model's folder if it is a regular file there, else None; checked."""
        if not os.path.lexists(self.path / entry):
            return None
        path = self.file(entry)
        return path if regular_file(path) else None

    @cached_property
    def config(self) -> dict:
        cfg_path = self.optional_file("config.json")
        if cfg_path is None:
            raise MergeError(f"model {self.ref!r}: no config.json in {self.path}")
        cfg = read_json_file(cfg_path, f"model {self.ref!r}: config.json")
        if not isinstance(cfg, dict):
            raise MergeError(f"model {self.ref!r}: config.json is not a JSON object")
        check_config_values(cfg, self.ref)
        return cfg

    def _weight_map(self, index: Path) -> dict[str, str]:
        what = f"model {self.ref!r}: model.safetensors.index.json"
        data = read_json_file(index, what)
        weight_map = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(weight_map, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
        ):
            raise MergeError(f"{what} has no 'weight_map' mapping tensor names to shard file names")
        return weight_map

    @cached_property
    def tensors(self) -> dict[str, TensorInfo]:
        index = self.optional_file("model.safetensors.index.json")
        weight_map: dict[str, str] | None = None
        if index is not None:
            weight_map = self._weight_map(index)
            files = sorted(set(weight_map.values()))
        elif self.optional_file("model.safetensors") is not None:
            files = ["model.safetensors"]
        else:
            files = sorted(p.name for p in self.path.glob("*.safetensors"))
            if not files:
                raise MergeError(
                    f"model {self.ref!r}: no safetensors weights in {self.path}{pickle_hint(self.path)}"
                )
        out: dict[str, TensorInfo] = {}
        for fname in files:
            fpath = self.file(fname)  # checked before it is opened: an index may name any path
            if not regular_file(fpath):
                if fpath.is_dir():
                    what = "is a folder, not a file"
                elif weight_map is not None:
                    what = "named in the index is missing"
                else:
                    what = "is not a readable file (a dangling or looping link?)"
                raise MergeError(f"model {self.ref!r}: weights file {fname} {what}")
            self._stamps[fpath] = file_stamp(os.stat(fpath))  # before the header: a later change shows
            for name, info in read_safetensors_header(fpath, self.ref).items():
                if weight_map is None or weight_map.get(name) == fname:
                    out[name] = info
        if weight_map is not None:
            missing = sorted(set(weight_map) - set(out))
            if missing:
                raise MergeError(
                    f"model {self.ref!r}: tensor {missing[0]!r} is in the index but not in its shard"
                )
        return out

    def _fd(self, file: Path) -> FileReader:
        with self._lock:
            reader = self._fds.get(file)
            if reader is None:
                reader = self._fds[file] = FileReader(file)
            return reader

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
        """Tensor ``name`` (rows [r0, r1) if given) as a numpy array of its stored bytes (NUMPY_STORAGE).
        While the tensor is held (:meth:`hold`) this is a read-only view of the held bytes."""
        info = self._info(name)
        return read_array(info, rows, self._fd(info.file), shared=True)

    def hold(self, name: str) -> Callable[[], None] | None:
        """Reserve tensor ``name``'s bytes to be held in memory for the reads to come, until
        :meth:`release`: returns the function that reads them (run it on a read-ahead thread; reads that
        come before it finishes wait for it). None where there is nothing to hold, or nothing to gain:
        bytes in the page cache are read from there, as often as needed, at memory speed."""
        cls = type(self)
        if cls.read is not ModelSource.read or cls.read_array is not ModelSource.read_array:
            return None  # a source that derives its tensors (LoRA, packed, remapped) reads its own way
        info = self.tensors.get(name)
        if info is None or not info.nbytes:
            return None
        try:
            reader = self._fd(info.file)
            if info.offset + info.nbytes > reader.size:
                return None  # not bytes of this file as they are (a derived source): its reads say why
            if reader.cached(info.offset, info.nbytes):
                return None
        except OSError:
            return None  # the read itself reports any real problem
        held = reader.reserve(info.offset, info.nbytes)
        return lambda: reader.fill(held)

    def release(self, name: str) -> None:
        """Drop the hold that :meth:`hold` took on tensor ``name``."""
        info = self.tensors.get(name)
        if info is not None and info.nbytes:
            with self._lock:
                reader = self._fds.get(info.file)
            if reader is not None:
                reader.release(info.offset, info.nbytes)

    def wrapped(self) -> list[ModelSource]:
        """The sources whose files this one reads through (a LoRA adapter's base, a remapped model)."""
        return []

    def changed_files(self) -> list[Path]:
        """Weights files read since their header was read whose open file is no longer that file as it
        was then: written to in place (size or modification time differ), or replaced before it was
        opened (another inode). Their bytes may not be what the header described."""
        with self._lock:
            readers = list(self._fds.items())
        changed = [
            file for file, reader in readers if file in self._stamps and reader.stamp() != self._stamps[file]
        ]
        return changed + [f for inner in self.wrapped() for f in inner.changed_files()]

    def close(self) -> None:
        with self._lock:
            for reader in self._fds.values():
                reader.close()
            self._fds.clear()

    def tokenizer_text(self) -> str | None:
        """The text of this model's tokenizer.json, or None when it has none."""
        path = self.optional_file("tokenizer.json")
        return None if path is None else path.read_text(encoding="utf-8", errors="replace")

    def tokenizer_files(self) -> list[Path]:
        """The tokenizer files to copy into an output, each checked to lie inside the model folder."""
        return [p for p in (self.optional_file(f) for f in TOKENIZER_FILES) if p is not None]
