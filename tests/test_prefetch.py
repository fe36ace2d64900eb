"""The executor's prefetcher: it announces the inputs of the tensors in plan order, never more than its
window ahead of the tensors the workers have started, and the merge's bytes do not depend on it."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

from mergesmith.pipeline.execute import Prefetcher
from mergesmith.pipeline.plan import TensorSource


class FakeModel:
    def __init__(self, sizes: dict[str, int]):
        self.tensors = {n: SimpleNamespace(nbytes=b) for n, b in sizes.items()}
        self.asked: list[str] = []
        self.lock = threading.Lock()

    def prefetch(self, name: str) -> int:
        with self.lock:
            self.asked.append(name)
        return self.tensors[name].nbytes


def fake_plan(n: int, size: int):
    a = FakeModel({f"t{i}": size for i in range(n)})
    b = FakeModel({f"t{i}": size for i in range(n)})
    tensors = [
        SimpleNamespace(sources=(TensorSource("a", f"t{i}"), TensorSource("b", f"t{i}"))) for i in range(n)
    ]
    return SimpleNamespace(models={"a": a, "b": b}, tensors=tensors), a, b


def wait_for(cond, timeout=5.0):
    end = time.monotonic() + timeout
    while not cond() and time.monotonic() < end:
        time.sleep(0.005)


def test_prefetch_stays_within_its_window_and_goes_in_order():
    plan, a, b = fake_plan(10, 100)  # 200 bytes of inputs per tensor
    p = Prefetcher(plan, ahead=450)  # the next tensor, plus one more that fits
    wait_for(lambda: len(p.asked) >= 2)
    time.sleep(0.05)
    assert p.asked == [0, 1]  # t2 would make 600 bytes ahead of the started tensors
    p.started(0)
    wait_for(lambda: len(p.asked) >= 3)
    time.sleep(0.05)
    assert p.asked == [0, 1, 2]
    p.started(5)  # workers ran ahead (cached inputs): the window moves with them
    wait_for(lambda: len(p.asked) >= 8)
    time.sleep(0.05)
    assert p.asked == list(range(8))
    p.stop()
    assert a.asked == b.asked == [f"t{i}" for i in range(8)]


def test_a_tensor_larger_than_the_window_is_still_announced_when_next():
    plan, a, _ = fake_plan(3, 10_000)
    p = Prefetcher(plan, ahead=1)
    wait_for(lambda: len(p.asked) >= 1)
    assert p.asked[:1] == [0]
    p.started(2)
    wait_for(lambda: len(p.asked) >= 3)
    p.stop()
    assert p.asked == [0, 1, 2] and a.asked == ["t0", "t1", "t2"]


def test_stop_ends_a_waiting_prefetcher():
    plan, _, _ = fake_plan(50, 100)
    p = Prefetcher(plan, ahead=0)
    p.stop()  # returns: the thread was waiting for the window
    assert len(p.asked) <= 1
