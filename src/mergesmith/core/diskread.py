"""Reading byte ranges of input files: through the page cache where they are already in it, past it
(``O_DIRECT``) where they are not.

A cold buffered read costs the kernel a fresh page-cache page for every 4 KiB it reads, a copy out of it,
and, once memory is full, the reclaim of an older page. Measured on a 2-core VM, that is about 1-2 s of
system CPU per GB read, and it held the disk to 0.8 GB/s. The same reads with ``O_DIRECT`` went straight
into our buffer at 1.4 GB/s with almost no CPU. But a direct read always goes to the disk, and a file
that is already in the page cache is read from memory 20x faster. So each read first asks ``mincore``
whether its range is in the cache, then picks the path. ``mincore`` runs on a mapping that is never
touched, so it reads nothing and faults nothing in.

Where a platform or file system has neither (no ``O_DIRECT``, no ``mincore``, a file system that refuses
direct reads), every read is buffered, as it was before.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import os
import threading
from pathlib import Path

import numpy as np

from mergesmith.core.errors import MergeError

ALIGN = 4096  # offset, length and buffer alignment of a direct read (covers 512-byte and 4 KiB sectors)
PAGE = mmap.PAGESIZE
# a range read past the page cache when less than this share of its pages is in it
RESIDENT_SHARE = 0.5
# ranges smaller than this are read through the cache: a direct read would cost a syscall round trip for
# little, and small reads (norms, biases) often share pages with their neighbours
DIRECT_MIN_BYTES = 1 << 20

_lock = threading.Lock()
_libc: ctypes.CDLL | None | bool = False  # False: not looked up yet


def _mincore_lib() -> ctypes.CDLL | None:
    global _libc
    with _lock:
        if _libc is False:
            _libc = None
            name = ctypes.util.find_library("c")
            try:
                lib = ctypes.CDLL(name, use_errno=True)
                lib.mmap.restype = ctypes.c_void_p
                lib.mmap.argtypes = [
                    ctypes.c_void_p,
                    ctypes.c_size_t,
                    ctypes.c_int,
                    ctypes.c_int,
                    ctypes.c_int,
                    ctypes.c_long,
                ]
                lib.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
                lib.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
                _libc = lib
            except (OSError, AttributeError, TypeError):
                pass
        return _libc or None


def resident_share(fd: int, offset: int, nbytes: int) -> float | None:
    """The share of the pages of bytes [offset, offset + nbytes) of file ``fd`` that are in the page
    cache, or None where it cannot be told."""
    lib = _mincore_lib()
    if lib is None or nbytes <= 0:
        return None
    start = offset - offset % PAGE
    length = offset + nbytes - start
    addr = lib.mmap(None, length, mmap.PROT_READ, mmap.MAP_SHARED, fd, start)
    if addr is None or addr == ctypes.c_void_p(-1).value:
        return None
    try:
        pages = (length + PAGE - 1) // PAGE
        vec = np.zeros(pages, dtype=np.uint8)
        if lib.mincore(addr, length, vec.ctypes.data) != 0:
            return None
        return float(np.count_nonzero(vec & 1)) / pages
    finally:
        lib.munmap(addr, length)


def aligned_empty(nbytes: int) -> np.ndarray:
    """``nbytes`` of uninitialised memory whose first byte is ALIGN-aligned."""
    raw = np.empty(nbytes + ALIGN, dtype=np.uint8)
    skew = (-raw.ctypes.data) % ALIGN
    return raw[skew : skew + nbytes]


def pread_into(fd: int, view: memoryview, offset: int, path: Path, need: int | None = None) -> None:
    """Fill ``view`` with the file's bytes from ``offset``; with ``need``, stop once that many are read (a
    direct read asks for whole blocks, and the last block of a file may be short)."""
    need = len(view) if need is None else need
    done = 0
    while done < need:
        n = os.preadv(fd, [view[done:]], offset + done)
        if n <= 0:
            raise MergeError(f"{path}: unexpected end of file while reading tensor data")
        done += n


def pread_direct(fd: int, offset: int, nbytes: int, path: Path) -> np.ndarray:
    """Bytes [offset, offset + nbytes) of the file open with O_DIRECT as ``fd``: the aligned blocks around
    them are read into an aligned buffer, of which the result is a view. Raises OSError (EINVAL) where
    the file system refuses the direct read."""
    start = offset - offset % ALIGN
    end = -(-(offset + nbytes) // ALIGN) * ALIGN
    buf = aligned_empty(end - start)
    pread_into(fd, memoryview(buf), start, path, need=offset + nbytes - start)
    return buf[offset - start : offset - start + nbytes]


FileStamp = tuple[int, int, int, int]


def file_stamp(st: os.stat_result) -> FileStamp:
    """What tells whether a file changed: its device and inode, size and modification time."""
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def open_direct(path: Path, flags: int) -> int | None:
    """``path`` opened with ``flags`` | O_DIRECT, or None where the platform or file system does not allow
    it (no O_DIRECT; tmpfs on older kernels)."""
    direct = getattr(os, "O_DIRECT", 0)
    if not direct:
        return None
    try:
        return os.open(path, flags | direct)
    except OSError:
        return None


class _Held:
    """Bytes [start, end) of a file held in memory for reads to come; ``ready`` is set once they are read
    (``data`` None if that read failed: readers then read for themselves and report the error)."""

    __slots__ = ("start", "end", "data", "refs", "ready", "claimed")

    def __init__(self, start: int, end: int):
        self.start, self.end = start, end
        self.data: np.ndarray | None = None
        self.refs = 1
        self.ready = threading.Event()
        self.claimed = False  # a fill has started


class FileReader:
    """One input file, open twice: buffered, and with O_DIRECT where the platform and file system allow.

    Byte ranges can be *held*: read once ahead of time (:meth:`reserve`, then :meth:`fill`, by the
    executor's read-ahead thread) and served from memory to every read that lies inside them until
    :meth:`release`. A read of a range that is still being filled waits for it rather than read it twice.
    """

    def __init__(self, path: Path):
        self.path = path
        self.fd = os.open(path, os.O_RDONLY)
        self.size = os.fstat(self.fd).st_size
        # direct reads only where mincore can tell which ranges are not in the page cache
        self._direct = open_direct(path, os.O_RDONLY) if _mincore_lib() is not None else None
        self._direct_ok = True
        self._lock = threading.Lock()
        self._held: list[_Held] = []
        self.direct_bytes = 0  # bytes read past the page cache (for tests and benchmarks)
        self.held_bytes = 0  # bytes served from held ranges (for tests and benchmarks)

    def stamp(self) -> FileStamp:
        """The open file's :func:`file_stamp` now."""
        return file_stamp(os.fstat(self.fd))

    # --- held ranges --------------------------------------------------------------------------------
    def reserve(self, offset: int, nbytes: int) -> _Held:
        """Announce that bytes [offset, offset + nbytes) will be held (one more reference if they are)."""
        with self._lock:
            for h in self._held:
                if h.start == offset and h.end == offset + nbytes:
                    h.refs += 1
                    return h
            h = _Held(offset, offset + nbytes)
            self._held.append(h)
            return h

    def fill(self, h: _Held) -> None:
        """Read a reserved range, once: a call while another one reads it waits for that read."""
        with self._lock:
            claimed, h.claimed = h.claimed, True
        if claimed:
            h.ready.wait()
            return
        try:
            h.data = self._read(h.start, h.end - h.start)
        except Exception:  # noqa: BLE001 - a read ahead of need: the reads that wanted it report the error
            h.data = None  # (they read for themselves), and nothing is left waiting
        finally:
            h.ready.set()

    def release(self, offset: int, nbytes: int) -> None:
        """Drop one reference to a held range; its memory goes with the last one."""
        with self._lock:
            for i, h in enumerate(self._held):
                if h.start == offset and h.end == offset + nbytes:
                    h.refs -= 1
                    if h.refs <= 0:
                        del self._held[i]
                    return

    def cached(self, offset: int, nbytes: int) -> bool:
        """Whether bytes [offset, offset + nbytes) are (mostly) in the page cache; False where that cannot
        be told."""
        share = resident_share(self.fd, offset, nbytes)
        return share is not None and share >= RESIDENT_SHARE

    def _holding(self, offset: int, nbytes: int) -> _Held | None:
        with self._lock:
            for h in self._held:
                if h.start <= offset and offset + nbytes <= h.end:
                    return h
        return None

    # --- reads --------------------------------------------------------------------------------------
    def read(self, offset: int, nbytes: int, copy: bool = True) -> np.ndarray:
        """Bytes [offset, offset + nbytes) as a uint8 array. From a held range when one covers them: a copy
        with ``copy``, else a view of the held bytes, which the caller must not write to. Otherwise read
        now, into memory the caller owns."""
        h = self._holding(offset, nbytes) if nbytes else None
        if h is not None:
            h.ready.wait()
            if h.data is not None:
                view = h.data[offset - h.start : offset - h.start + nbytes]
                self.held_bytes += nbytes
                if copy:
                    return view.copy()
                view.flags.writeable = False  # shared by every read of these bytes: a write is an error
                return view
        return self._read(offset, nbytes)

    def _read(self, offset: int, nbytes: int) -> np.ndarray:
        if self._direct is not None and self._direct_ok and nbytes >= DIRECT_MIN_BYTES:
            share = resident_share(self.fd, offset, nbytes)  # (not cached(): None means buffered here)
            if share is not None and share < RESIDENT_SHARE:
                try:
                    out = pread_direct(self._direct, offset, nbytes, self.path)
                    self.direct_bytes += nbytes
                    return out
                except OSError:  # the file system refused a direct read: buffered from now on
                    self._direct_ok = False
        buf = np.empty(nbytes, dtype=np.uint8)
        if nbytes:
            pread_into(self.fd, memoryview(buf), offset, self.path)
        return buf

    def close(self) -> None:
        with self._lock:
            self._held.clear()
        if self._direct is not None:
            os.close(self._direct)
        os.close(self.fd)
