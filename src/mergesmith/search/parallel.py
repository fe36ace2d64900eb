"""Where candidates are evaluated: in this process, in worker processes (``--workers N``), or on Ray
(``--ray [ADDRESS]``). Each worker builds its :class:`~mergesmith.search.engine.Evaluator` once, with the
input tensors read once by the search process (shipped to each worker process once, or put in Ray's
object store once and shared by the workers of a node). A candidate's score is a function of its config
alone (one torch thread, a fixed merge seed), so where it runs does not change the result."""

from __future__ import annotations

import multiprocessing
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from typing import Any

from mergesmith.core.errors import MergeError
from mergesmith.search.engine import Cache, Evaluation, Evaluator
from mergesmith.search.optimizers import need

_WORKER: Evaluator | None = None


def _init_worker(terms: list, model_ref: str, tokenizer_ref: str, cache: Cache, score_fn: Any = None) -> None:
    import torch

    torch.set_num_threads(1)
    global _WORKER
    _WORKER = Evaluator(terms, model_ref, tokenizer_ref, cache, score_fn)


def _evaluate(config: dict) -> Evaluation:
    assert _WORKER is not None
    return _WORKER.evaluate(config)


class SerialPool:
    def __init__(self, evaluator: Evaluator):
        self.evaluator = evaluator

    def run(self, configs: list[dict]) -> Iterator[tuple[int, Evaluation]]:
        for i, config in enumerate(configs):
            yield i, self.evaluator.evaluate(config)

    def close(self) -> None:
        pass


class ProcessPool:
    """``--workers N``: N worker processes (spawned: no inherited threads or locks)."""

    def __init__(
        self,
        workers: int,
        terms: list,
        model_ref: str,
        tokenizer_ref: str,
        cache: Cache,
        score_fn: Any = None,
    ):
        self.pool = ProcessPoolExecutor(
            max_workers=workers,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_init_worker,
            initargs=(terms, model_ref, tokenizer_ref, cache, score_fn),
        )

    def run(self, configs: list[dict]) -> Iterator[tuple[int, Evaluation]]:
        futures = {self.pool.submit(_evaluate, c): i for i, c in enumerate(configs)}
        pending = set(futures)
        try:
            while pending:
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for f in sorted(done, key=futures.__getitem__):
                    yield futures[f], f.result()
        finally:
            for f in pending:
                f.cancel()

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


class RayPool:
    """``--ray [ADDRESS]``: one Ray actor per worker; the input tensors go to the object store once."""

    def __init__(
        self,
        address: str | None,
        workers: int | None,
        terms: list,
        model_ref: str,
        tokenizer_ref: str,
        cache: Cache,
        score_fn: Any = None,
    ):
        ray = need("ray", "--ray")
        self.ray = ray
        self.started = not ray.is_initialized()
        if self.started:
            kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False}
            if address is None and workers is not None:
                kwargs["num_cpus"] = workers
            try:
                ray.init(address=address, **kwargs)
            except (ConnectionError, TimeoutError, RuntimeError, ValueError) as exc:
                # an address with no cluster behind it, or a bad one: Ray raises here, after its own retries
                where = f"the Ray cluster at {address!r}" if address else "a local Ray"
                raise MergeError(
                    f"--ray: cannot start or reach {where} ({exc.__class__.__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
                    "check the address (auto, HOST:PORT or ray://HOST:PORT) and that the cluster is up"
                ) from None
        if workers is None:  # one actor per CPU of the cluster
            workers = max(1, int(ray.cluster_resources().get("CPU", 1)))
        cache_ref = ray.put(cache)  # once; every actor on a node maps the same copy
        actor = ray.remote(num_cpus=1)(_RayWorker)
        self.actors = [
            actor.remote(terms, model_ref, tokenizer_ref, cache_ref, score_fn) for _ in range(workers)
        ]

    def run(self, configs: list[dict]) -> Iterator[tuple[int, Evaluation]]:
        refs = {self.actors[i % len(self.actors)].evaluate.remote(c): i for i, c in enumerate(configs)}
        pending = list(refs)
        while pending:
            done, pending = self.ray.wait(pending, num_returns=1)
            for r in done:
                yield refs[r], self.ray.get(r)

    def close(self) -> None:
        for a in self.actors:
            self.ray.kill(a)
        if self.started:
            self.ray.shutdown()


class _RayWorker:
    def __init__(self, terms: list, model_ref: str, tokenizer_ref: str, cache: Cache, score_fn: Any = None):
        _init_worker(terms, model_ref, tokenizer_ref, cache, score_fn)

    def evaluate(self, config: dict) -> Evaluation:
        return _evaluate(config)
