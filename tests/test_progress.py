"""The progress callback moves with every finished tensor, not only at the end."""

from __future__ import annotations

import threading
import time

import pytest

from mergesmith.core.errors import MergeError
from mergesmith.methods import get_method
from mergesmith.pipeline.api import make_plan
from mergesmith.pipeline.execute import ExecOptions, Executor, rows_per_chunk


def _plan(llama_trio):
    base, ft1, ft2 = llama_trio
    return make_plan(
        {
            "merge_method": "linear",
            "models": [{"model": str(m), "parameters": {"weight": 1.0}} for m in (base, ft1, ft2)],
        }
    )


def test_each_finished_tensor_is_reported_while_others_are_pending(llama_trio, monkeypatch):
    """The first tensor is held until the progress callback has seen every other one: with two workers,
    the other worker produces them one by one, and each must be reported before the first finishes."""
    plan = _plan(llama_trio)
    first = plan.tensors[0]
    others_reported = threading.Event()
    held = []

    def produce(self, t):
        if t is first:
            held.append(others_reported.wait(timeout=10))

    monkeypatch.setattr(Executor, "produce", produce)
    seen = []

    def progress(t):
        seen.append(t.name)
        if len(seen) == len(plan.tensors) - 1:
            others_reported.set()

    try:
        Executor(plan, None, ExecOptions(workers=2)).run(progress)
    finally:
        plan.close()
    assert held == [True], "the progress callback was not called until every tensor was done"
    # once per tensor, in completion order: the others in the order the second worker made them, then first
    assert seen == [t.name for t in plan.tensors[1:]] + [first.name]


def test_a_failure_stops_the_merge_before_the_remaining_tensors(llama_trio, monkeypatch):
    plan = _plan(llama_trio)
    failing = plan.tensors[1]
    produced = []

    def produce(self, t):
        if t is failing:
            raise MergeError("boom")
        time.sleep(0.02)
        produced.append(t.name)

    monkeypatch.setattr(Executor, "produce", produce)
    try:
        with pytest.raises(MergeError, match="boom"):
            Executor(plan, None, ExecOptions(workers=2)).run(lambda t: None)
    finally:
        plan.close()
    assert len(produced) < len(plan.tensors) // 2


def test_a_failure_stops_a_tensor_in_flight_at_its_next_chunk(llama_trio, monkeypatch):
    """The other worker stops within the row-chunked tensor it is making, not at its end (Ctrl-C took 5-8
    s to end a 3B-shaped merge while both workers finished their tensors)."""
    plan = _plan(llama_trio)
    big = plan.tensors[0]
    options = ExecOptions(workers=2, budget=2000, prefetch=False)  # the first tensor in many row chunks
    loads: list[int] = []
    started = threading.Event()
    load = Executor._load

    def counted(self, t, span, rng):
        if t is big:
            loads.append(1)
            started.set()
            time.sleep(0.005)
        return load(self, t, span, rng)

    def produce(self, t):
        if t is plan.tensors[1]:
            started.wait(timeout=10)
            raise MergeError("boom")
        original(self, t)

    original = Executor.produce
    monkeypatch.setattr(Executor, "_load", counted)
    monkeypatch.setattr(Executor, "_write", lambda self, t, data, span: None)
    monkeypatch.setattr(Executor, "produce", produce)
    executor = Executor(plan, None, options)
    chunks = -(-big.shape[0] // rows_per_chunk(big, get_method(big.method), executor.share))
    try:
        with pytest.raises(MergeError, match="boom"):
            executor.run(lambda t: None)
    finally:
        plan.close()
    assert chunks >= 20
    assert 1 <= len(loads) < chunks // 2, (len(loads), chunks)
