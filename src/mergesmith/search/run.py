"""The search loop (:func:`search`): candidates from the optimiser, evaluated where the options say,
journalled as they finish, and the outputs of OUT_DIR at the end."""

from __future__ import annotations

import copy
import csv
import dataclasses
import io
import json
import logging
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from mergesmith.core.cliargs import check_seed, check_workers
from mergesmith.core.errors import MergeError
from mergesmith.core.write import check_relations, input_paths, output_lock, write_atomic
from mergesmith.pipeline.config import load_yaml_documents, parse_config
from mergesmith.search.config import SearchConfig, check_files, read_search_config
from mergesmith.search.engine import Evaluation, Evaluator
from mergesmith.search.genome import SearchSpace
from mergesmith.search.journal import Journal
from mergesmith.search.optimizers import make_optimizer, need

log = logging.getLogger("mergesmith")

#: What may already be in OUT_DIR when a search resumes: its own files and nothing else.
OWN_FILES = {"journal", "best.yml", "candidates.csv", "search.png", "summary.json", "model"}
ScoreFn = Callable[[dict[str, Any]], float]


@dataclass
class Candidate:
    """One asked candidate, in the order asked (``evaluation`` counts from 1)."""

    evaluation: int
    generation: int
    x: tuple[float, ...]
    fitness: float
    scores: dict[str, float]
    merge_s: float
    score_s: float
    cached: bool


@dataclass
class SearchResult:
    out_dir: Path
    labels: list[str]
    candidates: list[Candidate]
    best: Candidate
    best_config: dict
    baseline_config: dict
    baseline_scores: dict[str, float] = field(default_factory=dict)
    baseline_fitness: float = 0.0
    held_out: dict[str, dict[str, float]] = field(default_factory=dict)  # baseline/best -> task -> accuracy


@dataclass(frozen=True)
class RunOptions:
    max_evals: int = 100
    seed: int = 0
    workers: int | None = None  # None: 1, or with Ray one per CPU of the cluster
    ray: bool = False
    ray_address: str | None = None
    resume: bool = False
    model: bool = True
    quiet: bool = False


def search(
    config: str | Path | SearchConfig,
    out_dir: str | Path,
    *,
    max_evals: int = 100,
    seed: int = 0,
    workers: int | None = None,
    ray: bool | str = False,
    resume: bool = False,
    write_model: bool = True,
    quiet: bool = False,
    score_fn: ScoreFn | None = None,
    on_generation: Callable[[int], None] | None = None,
) -> SearchResult:
    """Search merge recipes for ``config`` (a SEARCH.yml path or a parsed :class:`SearchConfig`), writing
    OUT_DIR (journal, best.yml, candidates.csv, summary.json, search.png, the best model unless
    ``write_model`` is false). ``ray``: True for a local Ray, or a cluster address. ``score_fn`` replaces the
    config's tasks with a function of the merged tensors (by name, as numpy or torch arrays; higher is
    better), for tests and for custom fitness from Python. ``on_generation(g)`` is called after
    generation ``g`` is journalled. Rerunning with the same config and seed continues a journalled search."""
    options = RunOptions(
        max_evals=max_evals,
        seed=seed,
        workers=workers,
        ray=bool(ray),
        ray_address=ray if isinstance(ray, str) else None,
        resume=resume,
        model=write_model,
        quiet=quiet,
    )
    return Search(config, out_dir, options, score_fn, on_generation).run()


def _check_filters(filters: list[str], names: list[str]) -> None:
    """A filter that matches no tensor is a typo: its values would be searched and never used."""
    for f in filters:
        if not any(f in name for name in names):
            example = next((n for n in names if ".layers." in n), names[0] if names else "")
            raise MergeError(
                f"genome.filters: {f!r} matches no tensor of the models (a filter is part of a tensor's "
                f"name, such as {example!r})"
            )


class Search:
    def __init__(self, config, out_dir, options: RunOptions, score_fn: ScoreFn | None, on_generation):
        self.options = options
        self.on_generation = on_generation
        self.score_fn = score_fn
        self._check_options()
        self.config = config if isinstance(config, SearchConfig) else read_search_config(config)
        self.source = str(config) if not isinstance(config, SearchConfig) else "search config"
        check_files(self.config)
        self.out_dir = Path(out_dir)
        if self.config.optimizer.name in ("cmaes", "tpe"):
            need(
                {"cmaes": "cmaes", "tpe": "optuna"}[self.config.optimizer.name],
                f"optimizer {self.config.optimizer.name}",
            )
        from mergesmith.search.terms import build_terms, held_out_terms

        self.terms = [] if score_fn is not None else build_terms(self.config)
        self.held_terms = held_out_terms(self.config)
        # the space needs the layer count: plan the genome once with one value per model
        self.evaluator = Evaluator(self.terms, "", "", score_fn=score_fn)
        probe = SearchSpace(self.config, 0)
        plan = self.evaluator.merger.plan(probe.to_config(probe.clip(probe.x0)))
        _check_filters(self.config.genome.filters or [], [t.name for t in plan.tensors])
        self.space = SearchSpace(self.config, plan.num_layers)
        self.model_ref = plan.config_model
        self.tokenizer_ref = plan.tokenizer_model
        self.evaluator.scorer.model_ref = self.model_ref
        self.evaluator.scorer.tokenizer_ref = self.tokenizer_ref
        self._check_answers()
        self.baseline_config = self._baseline_config()
        self.evaluator.merger.plan(
            self.baseline_config
        )  # a bad baseline config fails before anything is written
        check_relations(
            self.out_dir, input_paths([*self.config.genome.models, self.config.genome.base_model])
        )
        self.journal = Journal(self.out_dir / "journal")
        self._check_out_dir()

    # --- checks, before anything is written ------------------------------------------------------------
    def _check_answers(self) -> None:
        """answer_prob terms: every answer encodes with the tokenizer the candidates are scored with."""
        wanted = [t for t in self.terms if t.kind == "answer_prob"]
        if wanted:
            from mergesmith.eval.tasks import answer_rows

            tokenizer = self.evaluator.scorer.tokenizer()
            for term in wanted:
                answer_rows(tokenizer, term.data)

    def _check_options(self) -> None:
        o = self.options
        if o.max_evals < 1:
            raise MergeError(f"--max-evals must be at least 1, got {o.max_evals}")
        check_workers(o.workers)
        check_seed(o.seed)
        if o.ray:
            need("ray", "--ray")

    def _baseline_config(self) -> dict:
        if self.config.baseline is None:
            return self.space.to_config(self.space.clip(self.space.x0))
        path = self.config.baseline
        try:
            docs, _ = load_yaml_documents(Path(path))  # the merge configs' reader
        except MergeError as exc:
            raise MergeError(f"baseline: {exc}") from None
        data = docs[0] if len(docs) == 1 else None
        if not isinstance(data, dict):
            raise MergeError(f"baseline: {path} is not a merge config (a YAML mapping)")
        parse_config(copy.deepcopy(data), f"baseline {path}")  # its errors name the file, not 'config'
        return data

    def header(self) -> dict:
        return {
            "format": 1,
            "config": self.config.model_dump(mode="json"),
            "seed": self.options.seed,
            "labels": self.space.labels(),
        }

    def _check_out_dir(self) -> None:
        out = self.out_dir
        if out.exists() and not out.is_dir():
            raise MergeError(f"OUT_DIR {out} is a file; pass a folder for the search's outputs")
        if self.journal.exists():
            old = self.journal.header()
            new = json.loads(json.dumps(self.header()))
            if old != new:
                what = "seed" if old.get("config") == new["config"] else "search config"
                raise MergeError(
                    f"OUT_DIR {out} holds a search with another {what}; pass a new OUT_DIR (or the same "
                    "SEARCH.yml and --seed to continue that search)"
                )
            strange = sorted(p.name for p in out.iterdir() if p.name not in OWN_FILES)
            if strange:
                raise MergeError(
                    f"OUT_DIR {out} holds {strange[0]!r}, which a search does not write; move it away"
                )
            return
        if self.options.resume:
            raise MergeError(f"--resume: OUT_DIR {out} holds no search journal to continue")
        if out.exists() and any(out.iterdir()):
            raise MergeError(
                f"OUT_DIR {out} exists and is not empty (no search journal in it); pass a new or empty folder"
            )

    # --- the loop ---------------------------------------------------------------------------------------
    def run(self) -> SearchResult:
        with output_lock(self.out_dir):
            self.out_dir.mkdir(exist_ok=True)
            if not self.journal.exists():
                self.journal.create(self.header())
            candidates = self._loop()
            return self._finish(candidates)

    def _start(self):
        """The optimiser at the newest journalled generation, or a new one (saved as generation 0)."""
        saved = self.journal.latest_state()
        if saved is not None:
            return saved
        opt = self.config.optimizer
        lo, hi = self.space.bounds[:, 0], self.space.bounds[:, 1]
        u0 = (self.space.x0 - lo) / (hi - lo)
        if self.config.random_init:
            u0 = np.random.default_rng(self.options.seed).random(self.space.dim)
        optimizer = make_optimizer(opt.name, u0, opt.sigma0, opt.population, self.options.seed)
        self.journal.save_state(0, optimizer)
        return 0, optimizer

    def _pool(self):
        from mergesmith.search import parallel

        o = self.options
        args = (self.terms, self.model_ref, self.tokenizer_ref, self.evaluator.merger.cache)
        if o.ray:
            return parallel.RayPool(o.ray_address, o.workers, *args, score_fn=self.score_fn)
        if (o.workers or 1) > 1:
            return parallel.ProcessPool(o.workers, *args, score_fn=self.score_fn)
        return parallel.SerialPool(self.evaluator)

    def _loop(self) -> list[Candidate]:
        from tqdm import tqdm

        done: dict[tuple[float, ...], dict] = {}
        for record in self.journal.evals():
            done[tuple(record["x"])] = record
        generation, optimizer = self._start()
        population = optimizer.population
        generations = max(1, self.options.max_evals // population)
        # the input tensors, read once here and shared with the workers
        self.evaluator.merger.merge(self.baseline_config)
        history = self._replay(generation, done)
        bar = tqdm(
            total=generations * population,
            initial=min(len(history), generations * population),
            desc="search",
            unit="eval",
            disable=self.options.quiet,
            file=sys.stderr,
            dynamic_ncols=True,
        )
        pool = self._pool() if generation < generations else None
        best_fitness = max((c.fitness for c in history), default=-math.inf)
        try:
            for g in range(generation, generations):
                points = optimizer.ask()
                xs = [self.space.from_unit(p) for p in points]
                todo = list(dict.fromkeys(x for x in xs if x not in done))
                configs = [self.space.to_config(x) for x in todo]
                assert pool is not None
                for i, ev in pool.run(configs):
                    record = self._record(g, todo[i], ev)
                    self.journal.append(record)
                    done[todo[i]] = record
                    best_fitness = max(best_fitness, record["fitness"])
                    bar.set_postfix_str(f"best {best_fitness:.4f}", refresh=False)
                    bar.update(1)
                history += self._generation(g, xs, done, len(history))
                bar.update(len(xs) - len(todo))  # candidates asked again: their score is journalled
                optimizer.tell(points, [done[x]["fitness"] for x in xs])
                self.journal.save_state(g + 1, optimizer)
                if self.on_generation is not None:
                    self.on_generation(g)
        finally:
            bar.close()
            if pool is not None:
                pool.close()
        return history

    def _replay(self, generation: int, done: dict) -> list[Candidate]:
        """The candidates of the generations already told (0 .. generation-1), re-asked from the saved
        optimiser states so that their order is the uninterrupted run's."""
        history: list[Candidate] = []
        for g in range(generation):
            opt = self.journal.state(g)
            xs = [self.space.from_unit(p) for p in opt.ask()]
            missing = [x for x in xs if x not in done]
            if missing:
                raise MergeError(
                    f"search journal {self.journal.folder} misses a candidate of generation {g}; use a new OUT_DIR"
                )
            history += self._generation(g, xs, done, len(history))
        return history

    def _generation(self, g: int, xs: list[tuple[float, ...]], done: dict, before: int) -> list[Candidate]:
        """Generation ``g``'s candidates in the order asked; one is ``cached`` when it was scored before
        (an earlier generation, or earlier in this one), however the run was interrupted."""
        out, seen = [], set()
        for x in xs:
            record = done[x]
            out.append(
                self._candidate(before + len(out) + 1, g, record, cached=x in seen or record["gen"] != g)
            )
            seen.add(x)
        return out

    @staticmethod
    def _record(g: int, x: tuple[float, ...], ev: Evaluation) -> dict:
        return {
            "gen": g,
            "x": list(x),
            "fitness": ev.fitness,
            "scores": ev.scores,
            "merge_s": round(ev.merge_s, 4),
            "score_s": round(ev.score_s, 4),
        }

    @staticmethod
    def _candidate(n: int, g: int, record: dict, cached: bool) -> Candidate:
        return Candidate(
            n,
            g,
            tuple(record["x"]),
            record["fitness"],
            record["scores"],
            record["merge_s"],
            record["score_s"],
            cached,
        )

    # --- outputs --------------------------------------------------------------------------------------
    def _finish(self, history: list[Candidate]) -> SearchResult:
        best = max(history, key=lambda c: c.fitness)  # the first of equal ones
        result = SearchResult(
            out_dir=self.out_dir,
            labels=self.space.labels(),
            candidates=history,
            best=best,
            best_config=self.space.to_config(best.x),
            baseline_config=self.baseline_config,
        )
        base_eval = self.evaluator.evaluate(self.baseline_config)
        result.baseline_scores, result.baseline_fitness = base_eval.scores, base_eval.fitness
        if self.held_terms:
            # the search's scoring model, already loaded, on the held-out terms
            scorer = dataclasses.replace(self.evaluator.scorer, terms=self.held_terms)
            for label, cfg in (("baseline", self.baseline_config), ("best", result.best_config)):
                plan, tensors = self.evaluator.merger.merge(cfg)
                result.held_out[label] = scorer.score(plan, tensors)
        self._write(result)
        if not self.options.quiet:
            print(closing_table(result), file=sys.stderr)
        return result

    def _write(self, result: SearchResult) -> None:
        out = self.out_dir
        text = best_yaml(result)
        write_atomic(out / "best.yml", text.encode())
        write_atomic(out / "candidates.csv", candidates_csv(result).encode())
        write_atomic(out / "summary.json", (json.dumps(summary(result), indent=1) + "\n").encode())
        plot(result, out / "search.png")
        if self.options.model:
            from mergesmith.pipeline.api import merge

            merge(out / "best.yml", out / "model", overwrite=True, quiet=self.options.quiet)


def best_yaml(result: SearchResult) -> str:
    head = (
        f"# found by mergesmith search: evaluation {result.best.evaluation} of {len(result.candidates)}, "
        f"fitness {result.best.fitness:.6g}\n# merge it with: mergesmith merge best.yml OUT_DIR\n"
    )
    return head + yaml.safe_dump(result.best_config, sort_keys=False)


def candidates_csv(result: SearchResult) -> str:
    names = sorted({k for c in result.candidates for k in c.scores})
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(
        ["evaluation", "generation", "fitness", *names, "merge_s", "score_s", "cached", *result.labels]
    )
    for c in result.candidates:
        w.writerow(
            [c.evaluation, c.generation, repr(c.fitness), *(c.scores.get(n, "") for n in names)]
            + [c.merge_s, c.score_s, int(c.cached), *c.x]
        )
    return buf.getvalue()


def summary(result: SearchResult) -> dict:
    fresh = [c for c in result.candidates if not c.cached]
    return {
        "evaluations": len(result.candidates),
        "merged_and_scored": len(fresh),
        "best": {
            "evaluation": result.best.evaluation,
            "fitness": result.best.fitness,
            "scores": result.best.scores,
        },
        "baseline": {"fitness": result.baseline_fitness, "scores": result.baseline_scores},
        "held_out": result.held_out,
        "seconds_per_evaluation": {
            "merge": float(np.mean([c.merge_s for c in fresh])) if fresh else 0.0,
            "score": float(np.mean([c.score_s for c in fresh])) if fresh else 0.0,
        },
        "running_best": [float(v) for v in np.maximum.accumulate([c.fitness for c in result.candidates])],
    }


def closing_table(result: SearchResult) -> str:
    rows = [
        ("baseline", result.baseline_fitness, result.held_out.get("baseline")),
        ("best found", result.best.fitness, result.held_out.get("best")),
    ]
    held = sorted({k for _, _, h in rows if h for k in h})
    head = (
        f"{'recipe':<12}{'search fitness':>16}"
        + "".join(f"{n:>14}" for n in held)
        + (f"{'held-out mean':>15}" if held else "")
    )
    lines = [head]
    for label, fit, h in rows:
        cells = "".join(f"{100 * h[n]:>13.1f}%" for n in held) if h else ""
        mean = f"{100 * sum(h.values()) / len(h):>14.1f}%" if h else ""
        lines.append(f"{label:<12}{fit:>16.4f}{cells}{mean}")
    lines.append(
        f"best recipe: {result.out_dir / 'best.yml'} (evaluation {result.best.evaluation} of {len(result.candidates)})"
    )
    return "\n".join(lines)


def plot(result: SearchResult, path: Path) -> None:
    """search.png: fitness per evaluation, the running best and the baseline (skipped without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed: search.png is not drawn (pip install matplotlib)")
        return
    n = [c.evaluation for c in result.candidates]
    f = [c.fitness for c in result.candidates]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.scatter(n, f, s=8, alpha=0.5, label="candidate")
    ax.plot(n, np.maximum.accumulate(f), color="C1", label="best so far")
    ax.axhline(result.baseline_fitness, color="C2", linestyle="--", label="baseline")
    ax.set_xlabel("evaluation")
    ax.set_ylabel("fitness (search split)")
    ax.legend(loc="lower right")
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=100)
    plt.close(fig)
    write_atomic(path, png.getvalue())
