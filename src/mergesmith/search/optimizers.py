"""The optimisers, all maintained packages (``cmaes``, optuna's TPE) or plain seeded sampling, behind one
small interface: ``ask()`` a generation of points in the unit cube, ``tell()`` their fitness (higher is
better). Each is pickled whole after every generation (its random state included), which is what makes a
resumed search ask exactly the candidates an uninterrupted one asks."""

from __future__ import annotations

import importlib
from typing import Any, Protocol

import numpy as np

from mergesmith.core.errors import MergeError

EXTRA = "pip install 'mergesmith[search]'"


def need(module: str, what: str) -> Any:
    """Import an optional package or fail in one line naming the extra."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise MergeError(f"{what} needs the {module!r} package, which is not installed; {EXTRA}") from None


class Optimizer(Protocol):
    population: int

    def ask(self) -> list[np.ndarray]: ...

    def tell(self, points: list[np.ndarray], fitness: list[float]) -> None: ...


class CmaEs:
    """CMA-ES (the ``cmaes`` package) in the unit cube, started at ``x0`` with step ``sigma0``."""

    def __init__(self, x0: np.ndarray, sigma0: float, population: int | None, seed: int):
        cmaes = need("cmaes", "optimizer cmaes")
        dim = len(x0)
        bounds = np.tile([0.0, 1.0], (dim, 1))
        # the package refuses a mean on the bounds; nudge it inside by far less than a step
        mean = np.clip(x0, 1e-6, 1 - 1e-6)
        self.cma = cmaes.CMA(mean=mean, sigma=sigma0, bounds=bounds, seed=seed, population_size=population)
        self.population = self.cma.population_size

    def ask(self) -> list[np.ndarray]:
        return [self.cma.ask() for _ in range(self.population)]

    def tell(self, points: list[np.ndarray], fitness: list[float]) -> None:
        self.cma.tell([(p, -f) for p, f in zip(points, fitness, strict=True)])  # it minimises

    # The package's own pickling leaves out its random generator (an unpickled CMA asks other points)
    # and stores the covariance as a triangle; its attributes are pickled as they are instead.
    def __getstate__(self) -> dict[str, Any]:
        return {"population": self.population, "cma": type(self.cma), "state": dict(vars(self.cma))}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.population = state["population"]
        self.cma = state["cma"].__new__(state["cma"])
        vars(self.cma).update(state["state"])


class RandomSearch:
    """Uniform samples in the unit cube (numpy's seeded generator); the first generation's first point
    is the start point, so the search never ends below it."""

    def __init__(self, x0: np.ndarray, population: int | None, seed: int):
        self.rng = np.random.default_rng(seed)
        self.x0 = x0
        self.population = population or 8
        self.generation = 0

    def ask(self) -> list[np.ndarray]:
        points = list(self.rng.random((self.population, len(self.x0))))
        if self.generation == 0:
            points[0] = self.x0.copy()
        return points

    def tell(self, points: list[np.ndarray], fitness: list[float]) -> None:
        self.generation += 1


class Tpe:
    """optuna's TPE sampler (seeded), a generation of trials asked at once; the start point is enqueued
    as the first trial."""

    def __init__(self, x0: np.ndarray, population: int | None, seed: int):
        optuna = need("optuna", "optimizer tpe")
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        self.dim = len(x0)
        self.population = population or 8
        self.study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=seed))
        self.study.enqueue_trial({f"x{i}": float(v) for i, v in enumerate(x0)})
        self.trials: list[Any] = []

    def ask(self) -> list[np.ndarray]:
        self.trials = [self.study.ask() for _ in range(self.population)]
        return [np.array([t.suggest_float(f"x{i}", 0.0, 1.0) for i in range(self.dim)]) for t in self.trials]

    def tell(self, points: list[np.ndarray], fitness: list[float]) -> None:
        for trial, f in zip(self.trials, fitness, strict=True):
            self.study.tell(trial, f)
        self.trials = []


def make_optimizer(name: str, x0: np.ndarray, sigma0: float, population: int | None, seed: int) -> Optimizer:
    if name == "cmaes":
        return CmaEs(x0, sigma0, population, seed)
    if name == "tpe":
        return Tpe(x0, population, seed)
    return RandomSearch(x0, population, seed)
