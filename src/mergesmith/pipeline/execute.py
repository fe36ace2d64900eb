"""Streams the plan: read inputs, run the method kernel, write the output, with bounded memory.

Worker threads each take one output tensor at a time: read its inputs (``pread``, GIL released), compute
(torch, GIL released), write (``pwrite`` into the pre-laid-out shard). With a few workers, reading,
merging and writing of different tensors overlap. A tensor too big for its share of the memory budget is
processed in row chunks; statistic passes (thresholds, norms) re-read the chunks.
"""

from __future__ import annotations

import ctypes
import math
import os
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, replace
from typing import Any, Protocol

import numpy as np

from mergesmith.core import dtypes
from mergesmith.core._torch import torch
from mergesmith.core.errors import MergeError
from mergesmith.core.rng import RandomStream
from mergesmith.core.sizes import available_memory, human_size
from mergesmith.core.write import ShardedWriter
from mergesmith.methods import Chunk, Method, get_method
from mergesmith.pipeline.backends import Backend, Span
from mergesmith.pipeline.backends.torch import TorchBackend
from mergesmith.pipeline.plan import MergePlan, OutputTensor, TensorSource, merge_units

DEFAULT_BUDGET = 768 * 2**20  # bytes of tensor data in flight when no --memory-limit is given
BASELINE_RSS = 400 * 2**20  # Python, torch and the rest, when it cannot be measured (measured ~230 MiB)
# What the process grows by besides tensor data once the backend's engine is loaded: code pages of the
# torch ops a merge touches first (~50 MiB), numba loading or compiling its kernels (~80 MiB without a
# cache), threads, the index and the progress bar. Measured on TIES and linear merges of tiny models.
BASELINE_SLACK = 96 * 2**20
# headroom in the limit a refusal suggests, for the run-to-run jitter of the measured baseline
LIMIT_MARGIN = 8 * 2**20
# Resident memory that importing torch adds (measured: 225 MiB with torch 2.x on Linux); counted in the
# baseline of a merge that will run on torch before torch is imported (`mergesmith plan`)
TORCH_IMPORT_RSS = 240 * 2**20
# Peak RSS per byte of estimated working set, measured on TIES and SLERP merges of Qwen2-0.5B-shaped
# models at several --memory-limit values: temporaries inside the kernels and allocator fragmentation.
ALLOCATOR_OVERHEAD = 2.0
MIN_CHUNK_ELEMS = 1 << 16
# Input bytes the read-ahead thread may hold in memory for tensors not finished yet (ReadAhead): the
# inputs of a few layer tensors of a 3B-8B model. Counted in the peak estimate, and taken out of the
# budget under --memory-limit.
READ_AHEAD_BYTES = 512 * 2**20
# without --memory-limit, the read-ahead takes at most 1/READ_AHEAD_SHARE of the available memory
READ_AHEAD_SHARE = 8


@dataclass(frozen=True)
class ExecOptions:
    workers: int = 2
    budget: int = DEFAULT_BUDGET  # bytes of tensor data in flight, all workers together
    limit: int | None = None  # --memory-limit in bytes: the budget is settled against it (settle_budget)
    device: str = "cpu"
    seed: int = 0
    check_finite: bool = True
    backend: str = "auto"  # auto | native | torch
    # the read-ahead thread (ReadAhead); off where the backend serves inputs from memory (search)
    prefetch: bool = True
    ahead: int = READ_AHEAD_BYTES  # bytes it may hold


def bytes_per_element(t: OutputTensor, method: Method) -> int:
    """Working memory per output element: raw inputs, compute copies, the method's scratch, the output."""
    n_in = len(t.sources)
    csize = dtypes.itemsize(t.compute_code)
    osize = dtypes.itemsize(t.out_code)
    if t.copy:
        return osize
    raw = n_in * 4  # stored dtype (at most 4 bytes for the float formats read)
    return int(ALLOCATOR_OVERHEAD * (raw + n_in * csize + method.scratch * csize + osize + 1))


def baseline_rss(backend: str | None = None) -> int:
    """This process's resident memory now, plus slack: what a merge needs besides tensor data. With
    ``backend="torch"`` and torch not imported yet, what importing it will add is counted too."""
    torch_to_come = TORCH_IMPORT_RSS if backend == "torch" and "torch" not in sys.modules else 0
    try:
        with open("/proc/self/statm") as f:
            resident_pages = int(f.read().split()[1])
        return resident_pages * os.sysconf("SC_PAGE_SIZE") + BASELINE_SLACK + torch_to_come
    except (OSError, ValueError, IndexError):
        return BASELINE_RSS


def row_elems(t: OutputTensor) -> int:
    n = 1
    for d in t.shape[1:]:
        n *= d
    return n


def rows_per_chunk(t: OutputTensor, method: Method, share: int) -> int:
    """Rows of ``t`` per chunk so that one chunk's working memory fits in ``share`` bytes."""
    if len(t.shape) < 2 or not (method.chunkable or t.copy):
        return t.shape[0] if t.shape else 1
    per_row = bytes_per_element(t, method) * row_elems(t)
    return max(1, min(t.shape[0], share // per_row))


def task_bytes(t: OutputTensor, share: int) -> int:
    method = get_method(t.method)
    rows = rows_per_chunk(t, method, share)
    elems = rows * row_elems(t) if len(t.shape) >= 2 else t.numel
    return elems * bytes_per_element(t, method)


def estimate_peak(plan: MergePlan, options: ExecOptions, backend: str | None = None) -> int:
    """Peak memory estimate: baseline (with ``backend``'s engine) + the largest tasks in flight at once."""
    share = options.budget // max(1, options.workers)
    sizes = sorted((task_bytes(t, share) for t in merge_units(plan.tensors)), reverse=True)
    return baseline_rss(backend) + sum(sizes[: options.workers]) + read_ahead_peak(plan, options)


def read_ahead_peak(plan: MergePlan, options: ExecOptions) -> int:
    """The most input bytes the read-ahead can hold at once: its window, or all it would ever hold."""
    if not options.prefetch or options.ahead <= 0:
        return 0
    sizes = (input_bytes(plan, t) for t in merge_units(plan.tensors))
    return min(sum(size for size in sizes if size <= options.ahead), options.ahead)


def work_order(plan: MergePlan, ahead: int) -> list[OutputTensor]:
    """The order the workers take the tensors in: plan order (the order of the input files), except that
    with a read-ahead, tensors whose inputs do not fit its window go first. Those are read by the workers
    themselves, chunk by chunk and on some methods twice; started last (an untied lm_head is the last
    tensor of a Llama), one of them was a tail of several seconds with the other worker idle, where early
    they overlap with the rest. Every tensor lands at its own place in the output whatever the order."""
    units = merge_units(plan.tensors)
    if ahead <= 0:
        return units
    return sorted(units, key=lambda t: input_bytes(plan, t) <= ahead)  # stable: plan order otherwise


def unit_sources(t: OutputTensor) -> list[TensorSource]:
    """The inputs that producing ``t`` reads: a group's (experts merged as one tensor) for every member."""
    return [s for part in t.parts or (t,) for s in part.sources]


def input_bytes(plan: MergePlan, t: OutputTensor) -> int:
    """Stored bytes of the inputs that producing ``t`` reads."""
    total = 0
    for s in unit_sources(t):
        info = getattr(plan.models[s.model], "tensors", {}).get(s.tensor)
        total += info.nbytes if info is not None else 0
    return total


def settle_budget(plan: MergePlan, options: ExecOptions, baseline: int, backend: str) -> ExecOptions:
    """Under ``--memory-limit``: the tensor budget is what the limit leaves besides ``baseline`` (measured
    once the backend is chosen and its engine loaded: torch alone is a quarter GiB, so a budget taken
    before it was imported let merges overshoot the limit by that much); then :func:`fit_budget`. A limit
    below the baseline plus one row chunk of the largest tensor is refused up front with a limit that
    works (:func:`suggested_limit`). Under a limit the read-ahead gets a quarter of what the limit leaves
    (at most its own default) where the rest still holds one row chunk of the largest tensor, and
    nothing otherwise; without a limit its window is :func:`free_read_ahead`."""
    if options.limit is None:
        return fit_budget(plan, replace(options, ahead=free_read_ahead(options.ahead)))
    need = max((task_bytes(t, 0) for t in merge_units(plan.tensors)), default=0)
    if options.limit < baseline + need:
        raise MergeError(
            f"--memory-limit {human_size(options.limit)} is too small for this merge: the process needs "
            f"{human_size(baseline)} with the {backend} backend before any tensor is read, and "
            f"{human_size(need)} for the largest tensor in flight; a limit that works is "
            f"--memory-limit {suggested_limit(baseline + need)}MiB"
        )
    room = options.limit - baseline
    ahead = min(options.ahead, room // 4) if options.prefetch else 0
    if room - ahead < need:
        ahead = 0
    return fit_budget(plan, replace(options, budget=room - ahead, ahead=ahead))


def free_read_ahead(ahead: int) -> int:
    """The read-ahead window without --memory-limit: ``ahead``, or an eighth of the memory the system has
    available if that is less (a 512 MiB window on a machine with 1 GiB free would push it into swap)."""
    available = available_memory()
    return ahead if available is None else min(ahead, available // READ_AHEAD_SHARE)


def suggested_limit(smallest: int) -> int:
    """The limit (MiB) to suggest when ``smallest`` bytes are refused: the baseline is this process's
    resident memory, which differs by a little from one run to the next (a limit of exactly the
    measured need was refused on the rerun it suggested), so the suggestion has a margin of
    ``LIMIT_MARGIN`` and is rounded up to whole 16 MiB."""
    return math.ceil((smallest + LIMIT_MARGIN) / (16 * 2**20)) * 16


def fit_budget(plan: MergePlan, options: ExecOptions) -> ExecOptions:
    """Options whose workers each have room for one row chunk of every tensor; fail up front otherwise.

    Each worker gets budget / workers; when the largest one-row need does not fit that share, fewer
    workers run. If it does not fit the whole budget, the merge cannot keep to the limit.
    """
    units = merge_units(plan.tensors)
    need = max((task_bytes(t, 0) for t in units), default=0)  # one row, or a whole unchunkable tensor
    if need > options.budget:
        worst = max(units, key=lambda t: task_bytes(t, 0))
        raise MergeError(
            f"memory limit too small: tensor {worst.name!r} needs at least {human_size(need)} in flight "
            f"with method {worst.method!r}; raise --memory-limit"
        )
    workers = max(1, min(options.workers, options.budget // max(need, 1)))
    return replace(options, workers=workers)


class Cancelled(Exception):
    """Raised in a worker that sees the run cancelled between two chunks; the run's own error (the first
    failure, or KeyboardInterrupt) is what reaches the caller."""


class OutputHook(Protocol):
    """Receives every produced chunk instead of the writer, to transform it on its way (the ternary
    output of ``--out-format bitnet``). One tensor's chunks come from one thread, in row order."""

    def scans(self, t: OutputTensor) -> bool:
        """Whether ``t``'s chunks must all be seen once (``scan``) before the first ``write``, when
        ``t`` is produced in more than one chunk (a whole-tensor statistic, e.g. a scale)."""
        ...

    def scan(self, t: OutputTensor, data: torch.Tensor, span: Span) -> None: ...

    def write(self, t: OutputTensor, data: torch.Tensor, span: Span) -> None: ...


class Executor:
    def __init__(
        self,
        plan: MergePlan,
        writer: ShardedWriter,
        options: ExecOptions,
        hook: OutputHook | None = None,
        backend: Backend | None = None,
    ):
        self.plan = plan
        self.writer = writer
        self.options = options
        self.hook = hook
        self.share = options.budget // max(1, options.workers)
        self.backend = backend if backend is not None else TorchBackend(plan, options.device)
        self._cancel = threading.Event()

    def run(self, progress: Callable[[OutputTensor], None] | None = None) -> None:
        _tune_allocator()
        with self.backend.threads():
            self._run(progress)

    def _run(self, progress) -> None:
        ahead = self.options.ahead if self.options.prefetch else 0
        tensors = work_order(self.plan, ahead)
        prefetch = ReadAhead(self.plan, tensors, ahead) if ahead > 0 else NoReadAhead()
        try:
            self._run_all(tensors, progress, prefetch)
        finally:
            prefetch.stop()

    def _run_all(self, tensors: list[OutputTensor], progress, prefetch: ReadAhead | NoReadAhead) -> None:
        def report(t: OutputTensor) -> None:
            if progress:
                for part in t.parts or (t,):  # the bar counts the tensors written
                    progress(part)

        if self.options.workers <= 1:
            for i, t in enumerate(tensors):
                self._guarded(t, i, prefetch)
                report(t)
            return
        pool = ThreadPoolExecutor(max_workers=self.options.workers, thread_name_prefix="mergesmith")
        try:
            futures = {pool.submit(self._guarded, t, i, prefetch): (i, t) for i, t in enumerate(tensors)}
            pending = set(futures)
            while pending:
                # every finished tensor moves the progress bar at once (FIRST_EXCEPTION would return only
                # when all are done); a failure is raised as soon as its tensor is seen finishing
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for f in sorted(done, key=lambda f: futures[f][0]):
                    f.result()  # re-raise the first failure
                    report(futures[f][1])
        except BaseException:
            self._cancel.set()
            raise
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    def _guarded(self, t: OutputTensor, index: int, prefetch: ReadAhead | NoReadAhead) -> None:
        if not self._cancel.is_set():
            prefetch.started(index)
            try:
                # numpy's overflow and invalid-value warnings would print lines before the one error
                # that the finite check (_finish) gives for the same tensor
                with np.errstate(all="ignore"):
                    self.produce(t)
            finally:
                prefetch.finished(index)

    # --- one output tensor ------------------------------------------------------------------------
    def produce(self, t: OutputTensor) -> None:
        method = get_method(t.method)
        rows = rows_per_chunk(t, method, self.share)
        n_rows = t.shape[0] if t.shape else 1
        spans = [(r, min(r + rows, n_rows)) for r in range(0, n_rows, rows)] if t.shape else [None]
        chunks = self._chunks(t, method, spans)
        if len(spans) > 1 and self.hook is not None and any(self.hook.scans(p) for p in t.parts or (t,)):
            for span, data in chunks():  # a whole-tensor statistic first: the chunks are made twice
                for part, piece, part_span in _split(t, data, span):
                    self.hook.scan(part, piece, part_span)
        for span, data in chunks():
            for part, piece, part_span in _split(t, data, span):
                self._write(part, piece, part_span)

    def _chunks(self, t: OutputTensor, method: Method, spans: list) -> Callable[[], Iterator]:
        """A function that yields ``(span, output chunk)`` for every span, each call anew; the
        method's statistic passes run once, here."""
        if t.copy:
            return lambda: ((span, self.backend.read_copy(t, span)) for span in spans)
        kernel = method.kernel(dict(t.params), t.numel)
        rng = (
            [RandomStream(self.options.seed, t.name, i) for i in range(len(t.inputs))]
            if method.random
            else None
        )
        if len(spans) == 1:
            whole = [(spans[0], self._finish(t, kernel.run_whole(self._load(t, spans[0], rng))))]
            return lambda: iter(whole)
        kernel.observe_all(lambda: (self._load(t, span, rng) for span in spans))
        return lambda: ((span, self._finish(t, kernel.apply(self._load(t, span, rng)))) for span in spans)

    def _load(self, t: OutputTensor, span, rng) -> Chunk:
        # another tensor failed, or Ctrl-C: stop at the next chunk, not at the end of the tensor
        if self._cancel.is_set():
            raise Cancelled
        raw = get_method(t.method).raw_inputs
        read = self._read_group if t.parts else self.backend.read
        base = read(t, t.base, span, raw) if t.base is not None else None
        models = [read(t, s, span, raw) for s in t.inputs]
        start = span[0] * row_elems(t) if span else 0
        return Chunk(base, models, start, rng, self.backend.chunk_dtype(t))

    def _read_group(self, t: OutputTensor, src: TensorSource, span, raw: bool):
        """Rows ``span`` of a group's input ``src`` (a source of its first member): the same model's rows of
        each member they cover, one after another."""
        index = t.sources.index(src)
        pieces = [
            self.backend.read(part, part.sources[index], part_span, raw)
            for part, _, part_span in _part_spans(t, span)
        ]
        if len(pieces) == 1:
            return pieces[0]
        if isinstance(pieces[0], np.ndarray):
            return np.concatenate(pieces)
        return torch.cat(pieces)

    def _finish(self, t: OutputTensor, out):
        out, finite = self.backend.finish(t, out)
        if self.options.check_finite and not finite:
            models = ", ".join(s.model for s in t.sources)
            raise MergeError(
                f"tensor {t.name!r}: the merged values contain NaN or Inf (models: {models}); check the inputs "
                "and parameters (a weight sum near 0 with normalize, or out_dtype too narrow)"
            )
        return out

    def _write(self, t: OutputTensor, data, span) -> None:
        if self.hook is not None:
            self.hook.write(t, data, span)
            return
        offset = span[0] * row_elems(t) * dtypes.itemsize(t.out_code) if span else 0
        self.writer.write(t.name, data, offset)


def _part_spans(t: OutputTensor, span) -> Iterator[tuple[OutputTensor, int, tuple[int, int]]]:
    """The members of group ``t`` that its rows ``span`` cover: each with its first row in the group and
    the rows of its own that the span covers."""
    start, end = span if span else (0, t.shape[0])
    first = 0
    for part in t.parts:
        lo, hi = max(start, first), min(end, first + part.shape[0])
        if lo < hi:
            yield part, first, (lo - first, hi - first)
        first += part.shape[0]


def _split(t: OutputTensor, data, span) -> Iterator[tuple[OutputTensor, Any, Any]]:
    """An output chunk as the (tensor, data, span) pieces to write: itself, or a group's, per member."""
    if not t.parts:
        yield t, data, span
        return
    start = span[0] if span else 0
    rows = data.reshape(-1, row_elems(t))
    for part, first, (lo, hi) in _part_spans(t, span):
        yield part, rows[first + lo - start : first + hi - start], (lo, hi)


class NoReadAhead:
    """The executor's read-ahead when it is off: no thread, nothing held."""

    def started(self, index: int) -> None:
        pass

    def finished(self, index: int) -> None:
        pass

    def stop(self) -> None:
        pass


class ReadAhead:
    """Keeps the disk reading ahead of the workers: a thread reads the inputs of the next tensors in plan
    order into memory (``ModelSource.hold``), while the bytes held for tensors not yet finished stay
    within ``ahead``. The workers' reads of a held tensor are served from memory, so the disk reads while
    the workers compute, and a tensor processed in row chunks over several passes (a TIES threshold, then
    the output) is read from disk once, not once per pass. A tensor whose inputs alone are larger than
    ``ahead`` (an embedding) is left to the workers' own reads, and so are inputs already in the page cache
    (they are read from there at memory speed, as often as needed, without this process's memory). The
    thread never reads a tensor a worker has already started."""

    def __init__(self, plan: MergePlan, units: Sequence[OutputTensor], ahead: int):
        self._models = plan.models
        self._sources = [[(s.model, s.tensor) for s in unit_sources(t)] for t in units]
        self._sizes = [input_bytes(plan, t) for t in units]
        self._ahead = ahead
        self._started = 0  # tensors before this index have been started by a worker
        # tensor index -> the sources held for it and their bytes (inputs in the page cache are not held)
        self._held: dict[int, tuple[list[tuple[str, str]], int]] = {}
        self._bytes = 0  # input bytes held for tensors not finished yet
        self._stopped = False
        self._cond = threading.Condition()
        self.asked: list[int] = []  # tensors whose inputs were held, in order (for tests)
        self._thread = threading.Thread(target=self._run, name="mergesmith-readahead", daemon=True)
        self._thread.start()

    def started(self, index: int) -> None:
        """A worker started tensor ``index``. If the thread has not got to it and the window has room, the
        worker holds its inputs itself (read now, in its own thread), so that every pass over them is
        served from that one read."""
        fills: list[Callable[[], None]] = []
        with self._cond:
            if index + 1 > self._started:
                self._started = index + 1
                self._cond.notify()
            size = self._sizes[index]
            if index not in self._held and self._bytes + size <= self._ahead:
                fills = self._reserve(index)
        for fill in fills:
            fill()

    def finished(self, index: int) -> None:
        """A worker finished tensor ``index``: what was held for it is let go."""
        with self._cond:
            held, nbytes = self._held.pop(index, ([], 0))
            self._bytes -= nbytes
            self._cond.notify()
        self._release(held)

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify()
        self._thread.join()
        with self._cond:
            rest = [s for held, _ in self._held.values() for s in held]
            self._held.clear()
        self._release(rest)

    def _release(self, held: list[tuple[str, str]]) -> None:
        for model, tensor in held:
            self._models[model].release(tensor)

    def _run(self) -> None:
        for i, size in enumerate(self._sizes):
            if size > self._ahead:
                continue
            with self._cond:
                while not self._stopped and i >= self._started and self._bytes + size > self._ahead:
                    self._cond.wait()
                if self._stopped:
                    return
                if i < self._started:
                    continue  # a worker got there first (and held what fitted itself)
                fills = self._reserve(i)
            self.asked.append(i)
            for fill in fills:  # outside the lock: a worker that wants these bytes waits for them
                fill()

    def _reserve(self, index: int) -> list[Callable[[], None]]:
        """Reserve tensor ``index``'s inputs (under the lock); returns the functions that read them."""
        fills, held, nbytes = [], [], 0
        for model, tensor in self._sources[index]:
            source = self._models[model]
            hold = getattr(source, "hold", None)
            try:
                fill = hold(tensor) if hold is not None else None
            except Exception:  # noqa: BLE001 - holding is an optimisation: the worker's own read reports it
                fill = None
            if fill is not None:
                fills.append(fill)
                held.append((model, tensor))
                nbytes += source.tensors[tensor].nbytes
        self._held[index] = (held, nbytes)
        self._bytes += nbytes
        return fills


_allocator_tuned = False


def _tune_allocator() -> None:
    """Let glibc reuse freed tensor memory instead of unmapping and page-faulting it in again.

    Every tensor of a merge is allocated and freed many times at similar sizes; with glibc's default
    (adaptive) mmap threshold each allocation costs fresh page faults, which made elementwise maths
    2-3x slower. The freed memory stays with the process, bounded by the memory budget.
    """
    global _allocator_tuned
    if _allocator_tuned or not sys.platform.startswith("linux"):
        return
    _allocator_tuned = True
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 512 << 20)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, 512 << 20)  # M_TRIM_THRESHOLD
        libc.mallopt(-8, 1)  # M_ARENA_MAX: worker threads share the main heap (their own arenas page-fault)
        # M_TOP_PAD: grow the heap in large steps; with two workers freeing and allocating in turn, small
        # steps made the heap's top shrink and grow again, page-faulting the same memory several times
        libc.mallopt(-2, 256 << 20)
    except (OSError, AttributeError):  # not glibc
        pass
