"""Writing the output folder: pre-laid-out safetensors shards, the index, config, tokenizer and card.

The plan knows every output tensor's name, dtype and shape before any data exists, so the shards'
headers are written first and each tensor (or row chunk of a tensor) is written straight to its final
offset with ``pwrite`` by whichever thread computed it. No shard is ever buffered in memory.

Every command writes through :class:`OutputFolder`, which keeps these promises about OUT (see
docs/security.md):

- **One writer.** An exclusive ``flock`` on ``.OUT.mergesmith-lock`` beside OUT is held for the whole run,
  before OUT is looked at; a second run into the same OUT stops with one line. The lock file is removed
  by its holder (while still holding it; a waiter re-checks that the path still names the inode it
  locked), so no file stays beside a finished output; a killed run's lock file is reused and removed by
  the next run.
- **Only an output is replaced.** ``--overwrite`` never replaces the current folder or a parent of it, an
  input of the run (or a folder that contains one, or one inside one), a symbolic link or a file, and a
  folder that does not hold a model only with ``force`` as well.
- **Atomic commit.** The output is written into ``.OUT.<random>.partial`` beside OUT (which holds a
  marker file from its creation), then swapped with the old OUT in one ``renameat2(RENAME_EXCHANGE)``;
  the old tree is removed afterwards. Where the exchange is missing, two renames are used and the next
  run puts the old output back if a kill fell between them. Leftovers of killed runs (they carry the
  marker) are removed by the next run into the same OUT, under the lock, with one line giving their size.
- **Disk.** Free space is checked against the planned shards (keeping a reserve) before any block is
  preallocated; a full disk, a quota, a read-only file system or a denied permission at any step is one
  line, and the partial folder is removed. Folders and files get ``0o777``/``0o666`` less the umask, as
  ``save_pretrained`` gives.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import json
import os
import re
import secrets
import shutil
import sys
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from mergesmith.core import diskread, dtypes
from mergesmith.core.errors import MergeError
from mergesmith.core.model import ModelSource, check_unchanged
from mergesmith.core.sizes import human_size

INDEX_NAME = "model.safetensors.index.json"
MARKER = ".mergesmith-partial"
"""Written into every partial folder at its creation (and into an old output just before it is swapped
out): only folders that carry it are ever removed as leftovers."""
RESERVE_BYTES = 64 * 2**20
"""Free space kept after preallocating the shards (or 1% of a smaller file system), for the config,
tokenizer and card and for the rest of the system."""
DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}
MODEL_FILES = ("config.json", "adapter_config.json", INDEX_NAME)
MODEL_SUFFIXES = (".safetensors", ".gguf")


@dataclass(frozen=True)
class TensorSpec:
    """An output tensor's name, dtype (a safetensors code, e.g. 'BF16') and shape."""

    name: str
    code: str
    shape: tuple[int, ...]

    def __post_init__(self) -> None:
        dtypes.check_code(self.code, self.name)

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
    """Safetensors shards laid out up front; tensors are written by name at their final offsets.

    The files are closed by :meth:`finish` or :meth:`close` (also as a context manager), and by the
    constructor itself when it fails halfway."""

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
        self.direct_fds: list[int | None] = []  # the same files open with O_DIRECT (None: not allowed)
        self.direct_bytes = 0  # bytes written past the page cache (for tests and benchmarks)
        self._refused: list[int] = []
        self.total_size = 0
        self.pending: dict[str, int] = {}
        layouts = [self._layout(group) for group in groups]
        self.planned_bytes = sum(len(raw) + data for raw, data in layouts)
        check_free_space(folder, self.planned_bytes)
        try:
            for fi, (fname, group, (raw, data_bytes)) in enumerate(zip(self.files, groups, layouts)):
                fd = os.open(folder / fname, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o666)
                self.fds.append(fd)
                self.direct_fds.append(diskread.open_direct(folder / fname, os.O_WRONLY | os.O_CLOEXEC))
                _pwrite_all(fd, raw, 0)
                _preallocate(fd, len(raw) + data_bytes, folder, self.planned_bytes)
                offset = len(raw)
                for spec in group:
                    self.where[spec.name] = (fi, offset, spec.nbytes)
                    self.pending[spec.name] = spec.nbytes
                    offset += spec.nbytes
                self.total_size += data_bytes
        except BaseException:
            self.close()
            raise

    def _layout(self, group: list[TensorSpec]) -> tuple[bytes, int]:
        """One shard's header (length prefix included) and the bytes of its data."""
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
            self.where[spec.name] = (0, 0, 0)  # placeholder: names are unique across shards too
            offset += spec.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        return len(raw).to_bytes(8, "little") + raw, offset

    def __enter__(self) -> ShardedWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

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
        self._write_at(fi, data, start + byte_offset)
        self.pending[name] -= data.nbytes

    def _write_at(self, fi: int, data: np.ndarray, pos: int) -> None:
        """Write ``data`` (uint8) at ``pos`` of shard ``fi``: the whole 4 KiB blocks inside it past the
        page cache (``O_DIRECT``, from an aligned copy), the partial blocks at its ends through it.

        A buffered write into new page-cache pages cost 2.7 s of system CPU per GB on a 2-core VM, 19 s
        for a 7 GB output, where the direct writes of the same bytes cost 0.1 s. No page is written both
        ways: blocks that hold the end of one tensor and the start of the next are always buffered, the
        rest always direct, and a direct write drops any cached copy of its blocks, so reads of the file
        (by a later stage, or anyone) see the bytes written."""
        direct = self.direct_fds[fi]
        first = -(-pos // diskread.ALIGN) * diskread.ALIGN
        last = (pos + data.nbytes) // diskread.ALIGN * diskread.ALIGN
        if direct is not None and last - first >= diskread.DIRECT_MIN_BYTES:
            block = diskread.aligned_empty(last - first)
            np.copyto(block, data[first - pos : last - pos])
            try:
                _pwrite_all(direct, memoryview(block), first)
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
                self.direct_fds[fi] = None  # the file system refused: buffered from now on
                self._refused.append(direct)  # closed with the others: another thread may be using it
            else:
                self.direct_bytes += last - first
                _pwrite_all(self.fds[fi], memoryview(data[: first - pos]), pos)
                _pwrite_all(self.fds[fi], memoryview(data[last - pos :]), last)
                return
        _pwrite_all(self.fds[fi], memoryview(data), pos)

    def finish(self) -> None:
        """Check every byte was written, close the files and write the index for sharded output."""
        missing = [n for n, left in self.pending.items() if left != 0]
        if missing:
            self.close()
            raise MergeError(f"internal error: tensor {missing[0]!r} was not completely written")
        self.close()
        if len(self.files) > 1:
            weight_map = {name: self.files[fi] for name, (fi, _, _) in self.where.items()}
            index = {"metadata": {"total_size": self.total_size}, "weight_map": weight_map}
            write_json(self.folder / INDEX_NAME, index)

    def close(self) -> None:
        fds, self.fds = self.fds, []
        direct, self.direct_fds = self.direct_fds, []
        refused, self._refused = self._refused, []
        for fd in [*fds, *(d for d in direct if d is not None), *refused]:
            os.close(fd)


def _pwrite_all(fd: int, data: bytes | memoryview, pos: int) -> None:
    view = memoryview(data)
    while len(view):
        n = os.pwrite(fd, view, pos)
        view = view[n:]
        pos += n


def free_space(path: Path) -> tuple[int, int]:
    """(bytes free to this user, the reserve to keep) on the file system of ``path``."""
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize, min(RESERVE_BYTES, st.f_blocks * st.f_frsize // 100)


def check_free_space(folder: Path, needed: int) -> None:
    """Refuse before writing when ``needed`` bytes would not leave the reserve free."""
    free, reserve = free_space(folder)
    if needed + reserve > free:
        raise MergeError(
            f"not enough disk space for the output beside {folder.parent}: it needs {human_size(needed)} "
            f"(plus {human_size(reserve)} kept free), {human_size(free)} is free; free some space or "
            "choose another OUT_DIR"
        )


def _preallocate(fd: int, size: int, folder: Path, planned: int) -> None:
    """Reserve the file's blocks up front: writes into allocated space are several times faster than
    into a sparse file, and a full disk fails here, before any merging, rather than halfway."""
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as exc:
        if exc.errno in DISK_ERRNOS:
            raise disk_error(exc, folder, planned) from None
        os.ftruncate(fd, size)  # file systems without fallocate
    except AttributeError:  # platforms without posix_fallocate
        os.ftruncate(fd, size)


def disk_error(exc: OSError, folder: Path, needed: int | None = None, at_least: bool = False) -> MergeError:
    """The one-line message for a write that the file system refused."""
    where = folder.parent
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        try:
            free = human_size(free_space(where)[0])
        except OSError:
            free = "unknown"
        what = "disk quota exceeded" if exc.errno == errno.EDQUOT else "disk full"
        more = "more than " if at_least else ""
        need = f"needed {more}{human_size(needed)}" if needed is not None else "needed more"
        return MergeError(
            f"{what} while writing the output in {where}: {need}, {free} free; free some space or choose "
            "another OUT_DIR (nothing was written)"
        )
    if exc.errno == errno.EROFS:
        return MergeError(f"cannot write the output in {where}: the file system is read-only")
    name = f" {exc.filename}" if exc.filename else ""
    return MergeError(f"cannot write the output in {where}: permission denied{name}")


# --- the lock -------------------------------------------------------------------------------------------

_HELD: dict[str, list[Any]] = {}  # lock path -> [fd, count, thread id]: nested use by the same thread
_HELD_GUARD = threading.Lock()


def _lock_path(dest: Path) -> Path:
    return dest.parent / f".{dest.name}.mergesmith-lock"


def _busy(lock: Path, dest: Path) -> MergeError:
    try:
        pid = lock.read_text().strip() or "unknown"
    except OSError:
        pid = "unknown"
    return MergeError(
        f"output folder {dest} is being written by another mergesmith run (pid {pid}); wait for it or "
        "choose another OUT_DIR"
    )


def acquire_lock(dest: Path) -> None:
    """Take the exclusive lock on ``dest`` (an absolute path whose parent exists), or fail in one line."""
    lock = _lock_path(dest)
    key = str(lock)
    with _HELD_GUARD:
        held = _HELD.get(key)
        if held is not None:
            if held[2] != threading.get_ident():
                raise _busy(lock, dest)
            held[1] += 1
            return
        while True:
            try:
                fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o666)
            except OSError as exc:
                if exc.errno == errno.ELOOP:
                    raise MergeError(f"lock file {lock} is a symbolic link; remove it") from None
                raise disk_error(exc, dest) from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise _busy(lock, dest) from None
            # the holder before us may have removed the file after we opened it: lock the current one
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(lock, follow_symlinks=False))
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        _HELD[key] = [fd, 1, threading.get_ident()]


def release_lock(dest: Path) -> None:
    lock = _lock_path(dest)
    key = str(lock)
    with _HELD_GUARD:
        held = _HELD[key]
        held[1] -= 1
        if held[1]:
            return
        del _HELD[key]
        try:
            os.unlink(lock)  # while still holding it: see acquire_lock
        except OSError:
            pass
        os.close(held[0])


class output_lock:  # noqa: N801 - used as a context manager, like open()
    """``with output_lock(dest):`` holds ``dest``'s lock (reentrant for the same thread): a multi-stage
    merge holds its final output's lock for all its stages."""

    def __init__(self, dest: str | Path):
        self.dest = _absolute(dest)

    def __enter__(self) -> Path:
        self.created = _make_parent(self.dest)
        acquire_lock(self.dest)
        return self.dest

    def __exit__(self, exc_type, *exc: object) -> None:
        release_lock(self.dest)
        if exc_type is not None:
            _remove_created(self.created)


# --- what may be replaced -------------------------------------------------------------------------------


def _absolute(dest: str | Path) -> Path:
    """The destination with its parent's symbolic links resolved; its own name is kept (never followed)."""
    p = Path(os.path.abspath(Path(dest).expanduser()))  # "." and ".." resolved: the name is a real name
    return Path(os.path.realpath(p.parent)) / p.name


def _make_parent(dest: Path) -> list[Path]:
    """Create OUT's missing parent folders; returns them, outermost first, for :func:`_remove_created`."""
    missing = [p for p in [dest.parent, *dest.parent.parents] if not p.exists()][::-1]
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        return missing
    except OSError as exc:
        if exc.errno in DISK_ERRNOS:
            raise disk_error(exc, dest) from None
        raise MergeError(f"cannot create the folder {dest.parent}: {exc.strerror}") from None


def _remove_created(folders: list[Path]) -> None:
    """A failed run leaves no folder it created: remove those of ``folders`` that are still empty."""
    for p in reversed(folders):
        try:
            p.rmdir()
        except OSError:
            return


def input_paths(refs: Iterable[str | Path | None]) -> list[Path]:
    """The local folders that model references (``path``, ``org/name``, ``model+adapter``, ``ref@rev``)
    read from, without downloading anything: a Hub reference stands for the Hugging Face cache."""
    from mergesmith.core.model import parse_model_ref

    out: list[Path] = []
    for ref in refs:
        if ref is None:
            continue
        text = str(ref)
        parts = [text] if "+" not in text or Path(text).expanduser().exists() else text.split("+", 1)
        for part in parts:
            name = parse_model_ref(part)[0]
            path = Path(name).expanduser()
            if path.exists():
                out.append(path)
            elif name.count("/") == 1 and not name.startswith((".", "/", "~")):
                from huggingface_hub.constants import HF_HUB_CACHE

                out.append(Path(HF_HUB_CACHE))
    return out


def is_model_folder(folder: Path) -> bool:
    """A folder that a mergesmith command (or save_pretrained) could have written, or an empty one."""
    try:
        names = [e.name for e in os.scandir(folder) if e.is_file(follow_symlinks=False)]
        empty = not any(True for _ in os.scandir(folder))
    except OSError:
        return False
    return empty or any(n in MODEL_FILES or n.endswith(MODEL_SUFFIXES) for n in names)


def check_relations(dest: Path, inputs: Iterable[str | Path] = ()) -> None:
    """Refuse an OUT_DIR that is, contains or is inside an input of the run, or is the current folder or
    a parent of it. Paths only: this runs before anything is created beside OUT (not even the lock)."""
    real = _absolute(dest)
    for given in inputs:
        inp = Path(os.path.realpath(Path(given).expanduser()))
        if real == inp or real in inp.parents or inp in real.parents:
            how = "is" if real == inp else "contains" if real in inp.parents else "is inside"
            raise MergeError(
                f"output folder {dest} {how} the input {given} of this run; choose another OUT_DIR"
            )
    cwd = Path(os.path.realpath(os.getcwd()))
    if real == cwd or real in cwd.parents:
        what = "the current folder" if real == cwd else "a parent of the current folder"
        raise MergeError(f"output folder {dest} is {what}; it is never replaced, choose another OUT_DIR")


def check_destination(
    dest: Path, *, overwrite: bool, force: bool = False, inputs: Iterable[str | Path] = ()
) -> None:
    """Refuse, in one line, every OUT_DIR this run must not write or replace (see the module's doc)."""
    check_relations(dest, inputs)
    real = _absolute(dest)
    if not os.path.lexists(real):
        return
    if real.is_symlink():
        raise MergeError(
            f"output path {dest} is a symbolic link; give the folder itself (or remove the link)"
        )
    if not real.is_dir():
        raise MergeError(
            f"output path {dest} exists and is not a folder; remove it or choose another OUT_DIR"
        )
    if not overwrite:
        raise MergeError(f"output folder {dest} already exists; pass --overwrite to replace it")
    if not force and not is_model_folder(real):
        raise MergeError(
            f"output folder {dest} exists and does not hold a model (no config.json or weights); pass "
            "--force as well to replace it"
        )


# --- the atomic folder ----------------------------------------------------------------------------------


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux ``renameat2(RENAME_EXCHANGE)``); False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _write_marker(folder: Path, data: dict[str, Any]) -> None:
    (folder / MARKER).write_text(json.dumps(data) + "\n")


def _read_marker(folder: Path) -> dict[str, Any] | None:
    """The marker of a folder we wrote, or None (a user's folder, a symlink, a file)."""
    try:
        if folder.is_symlink() or not folder.is_dir():
            return None
        marker = folder / MARKER
        if marker.is_symlink() or not marker.is_file():
            return None
        data = json.loads(marker.read_text() or "{}")
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else {}


def _remove_tree(folder: Path) -> None:
    """Remove a marked folder with its marker last, so that a kill halfway leaves it recognisable."""
    try:
        entries = list(os.scandir(folder))
    except FileNotFoundError:
        return
    for e in entries:
        if e.name == MARKER:
            continue
        if e.is_dir(follow_symlinks=False):
            shutil.rmtree(e.path, ignore_errors=True)
        else:
            try:
                os.unlink(e.path)
            except FileNotFoundError:
                pass
    try:
        os.unlink(folder / MARKER)
    except FileNotFoundError:
        pass
    os.rmdir(folder)


def _tree_size(folder: Path) -> int:
    total = 0
    for root, _, files in os.walk(folder):
        for f in files:
            try:
                total += os.lstat(os.path.join(root, f)).st_size
            except OSError:
                pass
    return total


def recover_leftovers(dest: Path, quiet: bool = False) -> None:
    """Under the lock: undo or remove what killed runs into ``dest`` left, and say so in one line.

    - ``.OUT.*.old`` with a marker naming a partial that still exists: a kill fell between the two
      renames of the fallback commit, so OUT is missing; the old output is put back.
    - a marker inside OUT: a kill fell just after the exchange (or just before it); OUT is complete.
    - every other marked ``.OUT.*.partial`` / ``.OUT.*.old``: a dead run's folder, removed.
    """
    # exactly our names (".a.b.<token>.partial" belongs to OUT "a.b", never to OUT "a"), and our marker
    ours = re.compile(rf"\.{re.escape(dest.name)}\.[0-9a-f]{{8}}\.(partial|old)")
    try:
        names = sorted(os.listdir(dest.parent))
    except OSError:
        return
    found = {n: dest.parent / n for n in names if ours.fullmatch(n)}
    markers = {n: m for n, p in found.items() if (m := _read_marker(p)) is not None}
    if not os.path.lexists(dest):
        for n, m in markers.items():
            if n.endswith(".old") and m.get("replaced_by") in markers:
                os.rename(found[n], dest)
                del markers[n]
                if not quiet:
                    print(
                        f"mergesmith: put back {dest}, which an interrupted run had moved aside",
                        file=sys.stderr,
                    )
                break
    if _read_marker(dest) is not None:
        os.unlink(dest / MARKER)
    if markers:
        size = sum(_tree_size(found[n]) for n in markers)
        for n in markers:
            _remove_tree(found[n])
        if not quiet:
            print(
                f"mergesmith: removed {len(markers)} folder(s) left beside {dest} by interrupted runs "
                f"({human_size(size)})",
                file=sys.stderr,
            )


class OutputFolder:
    """The one way every command writes OUT_DIR: ``with OutputFolder(dest, ...) as out:``, write into
    ``out.path``, then ``out.commit(sources)``. Without a commit (an error, an interrupt) nothing is left.

    The constructor takes the lock, refuses what must not be written or replaced
    (:func:`check_destination`; ``inputs`` are the run's model and adapter folders, see
    :func:`input_paths`), removes leftovers of killed runs and creates the partial folder.
    """

    def __init__(
        self,
        dest: str | Path,
        overwrite: bool = False,
        *,
        force: bool = False,
        inputs: Iterable[str | Path] = (),
        quiet: bool = False,
    ):
        self.given = Path(dest)
        self.dest = _absolute(dest)
        self.committed = False
        inputs = list(inputs)
        check_relations(self.given, inputs)  # before anything is created beside (or inside) an input
        self.created = _make_parent(self.dest)
        try:
            acquire_lock(self.dest)
        except BaseException:
            _remove_created(self.created)
            raise
        try:
            recover_leftovers(self.dest, quiet)  # first: it may put a moved-aside OUT back
            check_destination(self.given, overwrite=overwrite, force=force, inputs=inputs)
            self.path = self._make_partial()
        except BaseException as exc:
            release_lock(self.dest)
            _remove_created(self.created)
            if isinstance(exc, OSError) and exc.errno in DISK_ERRNOS:
                raise disk_error(exc, self.dest) from None
            raise

    def _make_partial(self) -> Path:
        while True:
            path = self.dest.parent / f".{self.dest.name}.{secrets.token_hex(4)}.partial"
            try:
                os.mkdir(path, 0o777)  # the umask applies, as for save_pretrained's folders
            except FileExistsError:
                continue
            try:
                _write_marker(path, {"pid": os.getpid(), "out": self.dest.name})
            except BaseException:
                shutil.rmtree(path, ignore_errors=True)
                raise
            return path

    def __enter__(self) -> OutputFolder:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        written = 0
        try:
            if not self.committed:
                written = _tree_size(self.path)
                _remove_tree(self.path)
        finally:
            release_lock(self.dest)
            if not self.committed:
                _remove_created(self.created)
        if isinstance(exc, OSError) and exc.errno in DISK_ERRNOS:
            raise disk_error(exc, self.dest, written or None, at_least=True) from None

    def commit(self, read_from: Iterable[ModelSource]) -> Path:
        """Put the finished folder in place of OUT in one step (the old OUT, if any, is removed after).

        ``read_from``: the open input models the output was made from. If a weights file of one of them
        changed while it was read, the output may mix two versions of it: refused, nothing is put in
        place (:func:`mergesmith.core.model.check_unchanged`). Required, so that no command forgets it."""
        check_unchanged(read_from)
        try:
            if os.path.lexists(self.dest):
                self._replace()
            else:
                os.rename(self.path, self.dest)
                self.committed = True
                try:
                    os.unlink(self.dest / MARKER)
                except OSError:
                    pass  # removed by the next run into OUT
        except OSError as exc:
            if exc.errno in DISK_ERRNOS:
                raise disk_error(exc, self.dest) from None
            raise MergeError(f"cannot put the output in place at {self.dest}: {exc.strerror}") from None
        return self.dest

    def _replace(self) -> None:
        # marked first, so that a kill after the swap leaves the old tree recognisable as ours
        _write_marker(self.dest, {"replaced_by": self.path.name})
        try:
            if _exchange(self.path, self.dest):
                old = self.path
            else:  # two renames; a kill between them is undone by the next run (recover_leftovers)
                old = self.path.with_name(self.path.name.removesuffix(".partial") + ".old")
                os.rename(self.dest, old)
                try:
                    os.rename(self.path, self.dest)
                except BaseException:
                    os.rename(old, self.dest)
                    raise
        except BaseException:
            try:  # the old output stays as it was
                os.unlink(self.dest / MARKER)
            except OSError:
                pass
            raise
        self.committed = True
        try:  # the new output is in place; what is left here is removed by the next run
            os.unlink(self.dest / MARKER)
            _remove_tree(old)
        except OSError:
            pass


def copy_files(files: Sequence[Path], folder: Path) -> None:
    for f in files:
        shutil.copyfile(f, folder / f.name)


def write_atomic(path: Path, data: bytes, replace: bool = True) -> None:
    """``path`` holds either what it held or all of ``data``, never a part: written into a hidden file
    beside it (this process's own, so two writers never share one), synced, then renamed over ``path``
    or, with ``replace`` false, linked into place, which raises FileExistsError if ``path`` exists."""
    tmp = path.parent / f".{path.name}.{os.getpid()}.tmp"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if replace:
            os.replace(tmp, path)
        else:
            os.link(tmp, path)
    finally:
        if os.path.lexists(tmp):
            tmp.unlink()


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")


def byte_progress(total: int, desc: str, quiet: bool) -> tqdm:
    """The progress bar of a build that writes ``total`` bytes of tensors (on stderr; off with quiet)."""
    return tqdm(
        total=total,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        desc=desc,
        disable=quiet,
        file=sys.stderr,
        dynamic_ncols=True,
    )
