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
        SimpleNamespace(sources=(TensorSource("a", f"t{i}"), TensorSource("b", f"t{i}")), parts=())
        for i in range(n)
    ]
    return SimpleNamespace(models={"a": a, "b": b}, tensors=tensors), a, b


def wait_for(cond, timeout=5.0):
    end = time.monotonic() + timeout
    while not cond() and time.monotonic() < end:
        time.sleep(0.005)


def test_prefetch_stays_within_its_window_and_goes_in_order():
    plan, a, b = fake_plan(10, 100)  # 200 bytes of inputs per tensor
    p = Prefetcher(plan, plan.tensors, ahead=450)  # the next tensor, plus one more that fits
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
    p = Prefetcher(plan, plan.tensors, ahead=1)
    wait_for(lambda: len(p.asked) >= 1)
    assert p.asked[:1] == [0]
    p.started(2)
    wait_for(lambda: len(p.asked) >= 3)
    p.stop()
    assert p.asked == [0, 1, 2] and a.asked == ["t0", "t1", "t2"]


def test_stop_ends_a_waiting_prefetcher():
    plan, _, _ = fake_plan(50, 100)
    p = Prefetcher(plan, plan.tensors, ahead=0)
    p.stop()  # returns: the thread was waiting for the window
    assert len(p.asked) <= 1


def test_a_group_of_experts_announces_every_members_inputs():
    plan, a, b = fake_plan(4, 100)
    # tensors 1 and 2 merged as one (per-expert tensors of a layer), as the executor's units have them
    group = SimpleNamespace(sources=plan.tensors[1].sources, parts=(plan.tensors[1], plan.tensors[2]))
    units = [plan.tensors[0], group, plan.tensors[3]]
    p = Prefetcher(plan, units, ahead=10_000)
    wait_for(lambda: len(p.asked) >= 3)
    p.stop()
    assert p.asked == [0, 1, 2]
    assert a.asked == b.asked == ["t0", "t1", "t2", "t3"]
