"""Reading inputs: the page cache or a direct read (core/diskread.py), and the executor's read-ahead
thread, which holds the next tensors' inputs in memory within its window. Neither changes a merge's
bytes."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from safetensors.numpy import load_file

import mergesmith
from mergesmith.core import diskread
from mergesmith.core.diskread import FileReader, pread_direct, resident_share
from mergesmith.core.model import ModelSource
from mergesmith.core.write import ShardedWriter, TensorSpec
from mergesmith.methods import get_method
from mergesmith.pipeline.api import make_plan
from mergesmith.pipeline.backends.native import NativeBackend
from mergesmith.pipeline.backends.torch import TorchBackend
from mergesmith.pipeline.execute import ExecOptions, Executor, ReadAhead, input_bytes, work_order
from mergesmith.pipeline.plan import TensorSource, merge_units
from tiny_models import build, make_finetune, save, tiny_config

# --- the read-ahead thread, on fake models -------------------------------------------------------------


class FakeModel:
    def __init__(self, sizes: dict[str, int]):
        self.tensors = {n: SimpleNamespace(nbytes=b) for n, b in sizes.items()}
        self.held: list[str] = []  # names holding now, in the order they were held
        self.filled: list[str] = []
        self.lock = threading.Lock()

    def hold(self, name: str):
        with self.lock:
            self.held.append(name)
        return lambda: self.filled.append(name)

    def release(self, name: str) -> None:
        with self.lock:
            self.held.remove(name)


def fake_plan(n: int, size: int):
    a = FakeModel({f"t{i}": size for i in range(n)})
    b = FakeModel({f"t{i}": size for i in range(n)})
    tensors = [
        SimpleNamespace(sources=(TensorSource("a", f"t{i}"), TensorSource("b", f"t{i}")), parts=())
        for i in range(n)
    ]
    return SimpleNamespace(models={"a": a, "b": b}, tensors=tensors), a, b


def wait_for(cond, timeout=5.0):
    end = time.monotonic() + timeout
    while not cond() and time.monotonic() < end:
        time.sleep(0.005)


def settle(p: ReadAhead, count: int) -> None:
    wait_for(lambda: len(p.asked) >= count)
    time.sleep(0.05)  # and nothing more comes


def test_read_ahead_holds_in_order_within_its_window_and_lets_go_when_finished():
    plan, a, b = fake_plan(10, 100)  # 200 bytes of inputs per tensor
    p = ReadAhead(plan, plan.tensors, ahead=450)  # two tensors fit, a third does not
    settle(p, 2)
    assert p.asked == [0, 1] and a.held == b.held == ["t0", "t1"] and a.filled == ["t0", "t1"]
    p.started(0)
    p.started(1)
    settle(p, 2)
    assert p.asked == [0, 1]  # started is not finished: the held bytes are still in use
    p.finished(0)
    settle(p, 3)
    assert p.asked == [0, 1, 2] and a.held == ["t1", "t2"]
    p.started(6)  # the workers ran ahead: what they started they read for themselves
    p.finished(1)
    p.finished(2)
    settle(p, 5)
    assert p.asked == [0, 1, 2, 7, 8] and a.held == b.held == ["t7", "t8"]
    p.stop()
    assert a.held == b.held == []  # stopping lets go of everything


def test_a_worker_ahead_of_the_thread_holds_what_it_started_itself():
    """So that a tensor read over several passes is read from disk once even when the thread is late."""
    plan, a, b = fake_plan(6, 100)
    gate = threading.Event()
    slow = a.hold

    def hold(name):
        fill = slow(name)
        return (lambda: (gate.wait(5), fill())) if name == "t1" else fill

    a.hold = hold
    p = ReadAhead(plan, plan.tensors, ahead=1000)
    wait_for(lambda: "t1" in a.held)  # the thread is busy reading t1
    p.started(0)
    p.started(2)  # ahead of the thread, with room: held here, read before started returns
    assert a.filled == ["t0", "t2"] and b.filled[-1] == "t2"
    gate.set()
    settle(p, 5)
    assert p.asked == [0, 1, 3, 4]  # the thread skipped what the worker holds; t5 waits for room
    p.finished(2)
    assert "t2" not in a.held and "t2" not in b.held
    p.stop()
    assert a.held == b.held == []


def test_a_tensor_larger_than_the_window_is_left_to_the_workers():
    plan, a, _ = fake_plan(3, 1000)
    plan.models["a"].tensors["t1"].nbytes = 10_000
    p = ReadAhead(plan, plan.tensors, ahead=5000)
    settle(p, 2)
    p.stop()
    assert p.asked == [0, 2] and a.filled == ["t0", "t2"]


def test_stop_ends_a_waiting_read_ahead():
    plan, a, _ = fake_plan(50, 100)
    p = ReadAhead(plan, plan.tensors, ahead=250)
    settle(p, 1)
    p.stop()  # returns: the thread was waiting for room
    assert p.asked == [0] and a.held == []


def test_a_group_of_experts_holds_every_members_inputs():
    plan, a, b = fake_plan(4, 100)
    # tensors 1 and 2 merged as one (per-expert tensors of a layer), as the executor's units have them
    group = SimpleNamespace(sources=plan.tensors[1].sources, parts=(plan.tensors[1], plan.tensors[2]))
    units = [plan.tensors[0], group, plan.tensors[3]]
    p = ReadAhead(plan, units, ahead=10_000)
    settle(p, 3)
    assert p.asked == [0, 1, 2]
    assert a.filled == b.filled == ["t0", "t1", "t2", "t3"]
    p.finished(1)
    assert a.held == ["t0", "t3"]
    p.stop()


# --- reading a file --------------------------------------------------------------------------------------


@pytest.fixture
def data_file(tmp_path) -> tuple[Path, bytes]:
    data = np.random.default_rng(0).integers(0, 256, 3 * diskread.ALIGN + 777, dtype=np.uint8).tobytes()
    path = tmp_path / "data.bin"
    path.write_bytes(data)
    return path, data


def _direct_fd(path: Path) -> int:
    if not hasattr(os, "O_DIRECT"):
        pytest.skip("no O_DIRECT on this platform")
    try:
        return os.open(path, os.O_RDONLY | os.O_DIRECT)
    except OSError:
        pytest.skip("this file system refuses O_DIRECT")


@pytest.mark.parametrize(
    ("offset", "nbytes"), [(0, 10), (1, 4096), (4095, 2), (5000, 8000), (0, 12288 + 777)]
)
def test_a_direct_read_gives_the_bytes_of_any_unaligned_range(data_file, offset, nbytes):
    path, data = data_file
    fd = _direct_fd(path)
    try:
        got = pread_direct(fd, offset, nbytes, path)
    finally:
        os.close(fd)
    assert got.tobytes() == data[offset : offset + nbytes]


def test_a_read_past_the_end_of_the_file_is_one_clear_error(data_file):
    path, data = data_file
    fd = _direct_fd(path)
    try:
        with pytest.raises(mergesmith.MergeError, match="unexpected end of file"):
            pread_direct(fd, len(data) - 10, 20, path)
    finally:
        os.close(fd)


def test_residency_is_read_without_reading_the_file(data_file):
    path, data = data_file
    fd = os.open(path, os.O_RDONLY)
    try:
        os.pread(fd, len(data), 0)
        share = resident_share(fd, 0, len(data))
        if share is None:
            pytest.skip("no mincore here")
        assert share == 1.0  # just read: in the page cache
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        assert resident_share(fd, 0, len(data)) < 1.0
        assert resident_share(fd, 0, len(data)) < 1.0  # asking did not bring it back
    finally:
        os.close(fd)


def test_reads_go_past_the_cache_only_where_it_does_not_hold_the_range(data_file, monkeypatch):
    path, data = data_file
    monkeypatch.setattr(diskread, "DIRECT_MIN_BYTES", 0)
    reader = FileReader(path)
    try:
        if reader._direct is None:
            pytest.skip("no direct reads here")
        monkeypatch.setattr(diskread, "resident_share", lambda fd, offset, nbytes: 1.0)
        assert reader.read(5, 9000).tobytes() == data[5:9005] and reader.direct_bytes == 0
        monkeypatch.setattr(diskread, "resident_share", lambda fd, offset, nbytes: 0.0)
        assert reader.read(5, 9000).tobytes() == data[5:9005] and reader.direct_bytes == 9000
    finally:
        reader.close()


def test_held_bytes_are_read_once_and_served_until_released(data_file):
    path, data = data_file
    reader = FileReader(path)
    try:
        held = reader.reserve(100, 5000)
        started = threading.Event()
        got: list[np.ndarray] = []

        def early_reader():  # asks before the bytes are there: waits for them instead of reading
            started.set()
            got.append(reader.read(200, 10, copy=False))

        t = threading.Thread(target=early_reader)
        t.start()
        started.wait()
        time.sleep(0.05)
        assert not got
        reader.fill(held)
        t.join(5)
        assert got[0].tobytes() == data[200:210] and got[0].base is not None  # a view of the held bytes
        copied = reader.read(100, 5000)
        assert copied.tobytes() == data[100:5100] and reader.held_bytes == 5010
        copied[:] = 0  # a copy: the held bytes are not touched
        assert reader.read(300, 4).tobytes() == data[300:304]
        assert reader.read(50, 100).tobytes() == data[50:150]  # not inside the held range: read
        assert reader.held_bytes == 5014
        reader.release(100, 5000)
        reader.read(300, 4)
        assert reader.held_bytes == 5014  # released: read from the file again
    finally:
        reader.close()


def test_a_range_held_twice_is_read_once(data_file, monkeypatch):
    """Two tensors of a plan that read the same input (a layer repeated by a passthrough merge) share one
    held range; filling it twice at the same time reads it once."""
    path, data = data_file
    reader = FileReader(path)
    reads = []
    gate = threading.Event()
    real = FileReader._read

    def slow_read(self, offset, nbytes):
        reads.append(offset)
        gate.wait(5)
        return real(self, offset, nbytes)

    monkeypatch.setattr(FileReader, "_read", slow_read)
    try:
        first, second = reader.reserve(0, 100), reader.reserve(0, 100)
        assert first is second and first.refs == 2
        threads = [threading.Thread(target=reader.fill, args=(h,)) for h in (first, second)]
        for t in threads:
            t.start()
        time.sleep(0.05)
        gate.set()
        for t in threads:
            t.join(5)
        assert reads == [0] and reader.read(10, 5).tobytes() == data[10:15]
        reader.release(0, 100)
        assert reader.read(10, 5).tobytes() == data[10:15] and reads == [0]  # one reference left: held
        reader.release(0, 100)
        reader.read(10, 5)
        assert reads == [0, 10]  # released: read from the file
    finally:
        reader.close()


def test_a_failed_read_ahead_leaves_the_error_to_the_read_that_needs_it(data_file):
    """A held range that could not be read (the file shrank, a disk error) wakes its waiters, which read
    for themselves and report what is wrong in one line."""
    path, data = data_file
    reader = FileReader(path)
    try:
        held = reader.reserve(len(data) - 10, 100)  # past the end of the file
        reader.fill(held)
        assert held.ready.is_set() and held.data is None
        with pytest.raises(mergesmith.MergeError, match="unexpected end of file"):
            reader.read(len(data) - 10, 100)
        assert reader.read(len(data) - 10, 10).tobytes() == data[-10:]
    finally:
        reader.close()


def test_what_a_source_holds(llama_trio):
    """Only a plain model folder's reads are served from held bytes: a source that makes its tensors
    (LoRA applied, packed weights unpacked, rows remapped) reads its own way. Bytes in the page cache are
    not held."""
    plain = ModelSource.open(str(llama_trio[0]))

    class Derived(ModelSource):
        def read_array(self, name, rows=None):
            return super().read_array(name, rows) * 0

    derived = Derived.open(str(llama_trio[0]))
    name = next(iter(plain.tensors))
    try:
        cached = {plain.tensors[name].file: False}
        for source in (plain, derived):
            reader = source._fd(plain.tensors[name].file)
            reader.cached = lambda offset, nbytes: cached[plain.tensors[name].file]
        assert plain.hold(name) is not None and plain.hold("no.such.tensor") is None
        assert derived.hold(name) is None
        cached[plain.tensors[name].file] = True
        assert plain.hold(name) is None  # in the page cache: read from there, not held
    finally:
        plain.close()
        derived.close()


# --- whole merges ----------------------------------------------------------------------------------------

METHODS = {
    "linear": {"weight": 0.6},
    "task_arithmetic": {"weight": 0.6},
    "ties": {"weight": 0.6, "density": 0.4},
    "dare_ties": {"weight": 0.6, "density": 0.4},
    "dare_linear": {"weight": 0.6, "density": 0.4},
    "breadcrumbs_ties": {"weight": 0.6, "density": 0.6, "gamma": 0.1},
    "della": {"weight": 0.6, "density": 0.5, "epsilon": 0.1},
    "slerp": None,
}


def _config(trio, method: str) -> dict:
    base, ft1, ft2 = trio
    if method == "slerp":
        return {"merge_method": "slerp", "base_model": str(base), "models": [{"model": str(ft1)}],
                "parameters": {"t": 0.3}}  # fmt: skip
    models = [{"model": str(m), "parameters": METHODS[method]} for m in (ft1, ft2)]
    if method == "linear":
        return {"merge_method": method, "models": models}
    return {"merge_method": method, "base_model": str(base), "models": models}


def _run(cfg: dict, folder: Path, backend, options: ExecOptions) -> tuple[dict, int]:
    plan = make_plan(cfg)
    folder.mkdir()
    try:
        specs = [TensorSpec(t.name, t.out_code, t.shape) for t in plan.tensors]
        with ShardedWriter(folder, specs, 1 << 30) as writer:
            made = backend(plan) if backend is NativeBackend else backend(plan, "cpu")
            Executor(plan, writer, options, backend=made).run()
            writer.finish()
        served = sum(r.held_bytes for m in plan.models.values() for r in getattr(m, "_fds", {}).values())
    finally:
        plan.close()
    out: dict = {}
    for f in folder.glob("*.safetensors"):
        out.update(load_file(f))
    return out, served


@pytest.mark.parametrize(
    ("method", "backend"),
    [(m, NativeBackend) for m in METHODS if get_method(m).native] + [(m, TorchBackend) for m in METHODS],
)
def test_held_inputs_give_the_bytes_of_reads_from_disk(llama_trio, tmp_path, monkeypatch, method, backend):
    """Every tensor in row chunks, read over several passes from held bytes (views, on the native
    backend), gives the bytes that reading every chunk from disk gives: no kernel writes to its inputs."""
    cfg = _config(llama_trio, method)
    monkeypatch.setattr(FileReader, "cached", lambda self, offset, nbytes: False)  # as if cold
    off, _ = _run(cfg, tmp_path / "off", backend, ExecOptions(workers=2, budget=6000, prefetch=False))
    on, served = _run(cfg, tmp_path / "on", backend, ExecOptions(workers=2, budget=6000, ahead=1 << 20))
    assert served > 0
    assert off.keys() == on.keys()
    for name in off:
        np.testing.assert_array_equal(on[name], off[name], err_msg=name)


@pytest.mark.parametrize("method", ["ties", "task_arithmetic"])
def test_an_input_that_two_tensors_read_is_not_changed_by_the_first(
    llama_trio, tmp_path, monkeypatch, method
):
    """Layer 1 merged into output layers 1 and 2 (repeated layer ranges): both output tensors read views of
    one held range of each input. The float32 task-vector path used to subtract in place into its model's
    buffer, which changed what the second tensor then read (a silently wrong merge); held views are
    read-only, and the kernels make a new array for them."""
    base, ft1, ft2 = llama_trio

    def sources(layers):
        return [
            {"model": str(m), "layer_range": layers, "parameters": METHODS[method]} for m in (base, ft1, ft2)
        ]

    cfg = {
        "merge_method": method,
        "base_model": str(base),
        "slices": [{"sources": sources([0, 2])}, {"sources": sources([1, 3])}],
    }
    monkeypatch.setattr(FileReader, "cached", lambda self, offset, nbytes: False)  # as if cold
    off, _ = _run(cfg, tmp_path / "off", NativeBackend, ExecOptions(workers=1, prefetch=False))
    on, served = _run(cfg, tmp_path / "on", NativeBackend, ExecOptions(workers=1, ahead=1 << 20))
    assert served > 0
    assert np.array_equal(off["model.layers.1.mlp.up_proj.weight"], off["model.layers.2.mlp.up_proj.weight"])
    for name in off:
        np.testing.assert_array_equal(on[name], off[name], err_msg=name)


def test_a_merge_read_past_the_page_cache_gives_the_same_bytes(llama_trio, tmp_path, monkeypatch):
    cfg = _config(llama_trio, "ties")
    buffered, _ = _run(cfg, tmp_path / "buffered", NativeBackend, ExecOptions(workers=2, budget=6000))
    monkeypatch.setattr(diskread, "DIRECT_MIN_BYTES", 0)
    monkeypatch.setattr(diskread, "resident_share", lambda fd, offset, nbytes: 0.0)
    direct_bytes = []
    real_read = FileReader._read

    def spy(self, offset, nbytes):
        before = self.direct_bytes
        out = real_read(self, offset, nbytes)
        direct_bytes.append(self.direct_bytes - before)
        return out

    monkeypatch.setattr(FileReader, "_read", spy)
    direct, _ = _run(cfg, tmp_path / "direct", NativeBackend, ExecOptions(workers=2, budget=6000))
    if not any(direct_bytes):
        pytest.skip("this file system refuses direct reads")
    for name in buffered:
        np.testing.assert_array_equal(direct[name], buffered[name], err_msg=name)


@pytest.fixture(scope="module")
def wide_trio(tmp_path_factory) -> tuple[Path, Path, Path]:
    """A one-layer Llama with 256 KiB matrices and two fine-tunes: row chunks of several 4 KiB blocks."""
    root = tmp_path_factory.mktemp("wide")
    config = tiny_config("llama", layers=1, hidden_size=128, intermediate_size=512)
    base = save(build(config), root / "base")
    return base, make_finetune(base, root / "ft1", seed=1), make_finetune(base, root / "ft2", seed=2)


@pytest.mark.parametrize("limit", [None, 2 * 2**20])
def test_a_merge_written_past_the_page_cache_gives_the_same_bytes(
    wide_trio, tmp_path, monkeypatch, fixed_baseline, limit
):
    """Whole blocks go out with O_DIRECT, the blocks shared by two tensors (or two row chunks) through the
    page cache; two workers write side by side. The file reads back as a buffered write gives."""
    cfg = _config(wide_trio, "ties")
    buffered = (mergesmith.merge(cfg, tmp_path / "buffered", quiet=True) / "model.safetensors").read_bytes()
    monkeypatch.setattr(diskread, "DIRECT_MIN_BYTES", 0)
    written = []
    real = ShardedWriter.finish

    def spy(self):
        written.append((self.direct_bytes, any(fd is not None for fd in self.direct_fds)))
        real(self)

    monkeypatch.setattr(ShardedWriter, "finish", spy)
    pieces = []
    real_write = ShardedWriter._write_at
    monkeypatch.setattr(ShardedWriter, "_write_at", lambda self, *a: (pieces.append(1), real_write(self, *a)))
    # with a limit: a budget of 2 MiB, matrices written in row chunks of 32 KiB or so
    out = mergesmith.merge(
        cfg, tmp_path / "direct", quiet=True, memory_limit=limit and fixed_baseline + limit
    )
    direct_bytes, allowed = written[-1]
    if not allowed:
        pytest.skip("this file system refuses direct writes")
    assert direct_bytes > len(buffered) // 2
    assert (out / "model.safetensors").read_bytes() == buffered
    tensors = len(load_file(out / "model.safetensors"))
    assert len(pieces) == tensors if limit is None else len(pieces) > 2 * tensors


def test_tensors_too_big_for_the_window_are_started_first(llama_trio):
    cfg = _config(llama_trio, "ties")
    plan = make_plan(cfg)
    try:
        units = merge_units(plan.tensors)
        sizes = {t.name: input_bytes(plan, t) for t in units}
        ahead = sorted(sizes.values())[-3]  # the two largest do not fit
        order = [t.name for t in work_order(plan, ahead)]
        big = [t.name for t in units if sizes[t.name] > ahead]
        assert len(big) == 2 and order[:2] == big
        assert order[2:] == [t.name for t in units if t.name not in big]  # the rest in plan order
        assert [t.name for t in work_order(plan, 0)] == [t.name for t in units]  # no read-ahead: plan order
    finally:
        plan.close()


@pytest.mark.parametrize(
    ("available", "window"),
    [(None, 512 * 2**20), (64 * 2**30, 512 * 2**20), (2**30, 128 * 2**20), (256 * 2**20, 32 * 2**20)],
)
def test_the_window_without_a_limit_is_at_most_an_eighth_of_the_free_memory(
    llama_trio, monkeypatch, available, window
):
    from mergesmith.pipeline import execute

    monkeypatch.setattr(execute, "available_memory", lambda: available)
    plan = make_plan(_config(llama_trio, "ties"))
    try:
        settled = execute.settle_budget(plan, ExecOptions(), 0, "native")
        assert settled.ahead == window
        # under --memory-limit the limit decides, not the free memory
        limited = execute.settle_budget(plan, ExecOptions(limit=2**30), 0, "native")
        assert limited.ahead == min(execute.READ_AHEAD_BYTES, 2**30 // 4)
    finally:
        plan.close()


def test_available_memory_is_read_from_meminfo():
    from mergesmith.core.sizes import available_memory

    found = available_memory()
    if Path("/proc/meminfo").is_file():
        assert found is not None and 0 < found
    else:
        assert found is None
