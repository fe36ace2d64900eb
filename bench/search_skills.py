"""`mergesmith search` on the shipped skill experts: how much of the experts' accuracy a searched recipe
keeps, how fast it gets there, what an evaluation costs, and Ray against a serial run.

All four experts (examples/skills), the method searched with per-layer weights and densities (TIES by
default), fitness on each skill's validation split (the first ``--limit`` prompts), reported on the
500-prompt test splits. Normalized accuracy is docs/skills.md's: merged / expert's own score on its
skill, averaged over the skills (the hand-tuned TIES merge keeps 0.46 of it on test).

For the curve, every candidate that improved the running best is scored on test too, so the table says
after how many evaluations the best-so-far recipe kept 0.5 and 0.6 of the experts on test (and on val).

    PYTHONPATH=src python bench/search_skills.py --out /tmp/search-bench [--max-evals 300] [--ray-evals 40]

Writes OUT/search (the search's own folder), OUT/ray, OUT/serial (the Ray comparison) and OUT/figures.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch

from mergesmith.eval import evaluate_tasks, load_tasks
from mergesmith.search import search
from mergesmith.search.config import parse_search_config
from mergesmith.search.engine import Merger, Scorer
from mergesmith.search.genome import SearchSpace
from mergesmith.search.terms import FitnessTerm

ROOT = Path(__file__).resolve().parent.parent
SKILLS = ROOT / "examples" / "skills"
NAMES = ("count", "rev", "shift", "sort")


def hand_tuned(out: Path) -> Path:
    """docs/skills.md's best hand-tuned TIES (density 0.2, lambda 1.5): the baseline of the table."""
    path = out / "hand-tuned-ties.yml"
    models = "".join(f"  - model: {SKILLS / 'models' / s}\n    parameters: {{weight: 1.0}}\n" for s in NAMES)
    path.write_text(
        f"merge_method: ties\nbase_model: {SKILLS / 'models' / 'base'}\n"
        f"parameters: {{density: 0.2, lambda: 1.5}}\nmodels:\n{models}"
    )
    return path


def search_config(
    method: str,
    limit: int,
    granularity: int,
    filters: list[str] | None,
    population: int | None,
    init: dict[str, float],
    baseline: Path,
    normalize: bool,
    metric: str = "exact_match",
) -> dict:
    genome: dict = {
        "models": [str(SKILLS / "models" / s) for s in NAMES],
        "base_model": str(SKILLS / "models" / "base"),
        "merge_method": method,
        "layer_granularity": granularity,
        "normalize": normalize,
    }
    if filters:
        genome["filters"] = filters
    if method == "task_arithmetic":
        init = {k: v for k, v in init.items() if k != "density"}
    return {
        "genome": genome,
        "tasks": [
            {"name": s, "tasks_file": str(SKILLS / "data" / s / "val.jsonl"), "metric": metric} for s in NAMES
        ],
        "held_out": [str(SKILLS / "data" / s / "test.jsonl") for s in NAMES],
        "limit": limit,
        "baseline": str(baseline),
        "optimizer": {"name": "cmaes", "init": init, **({"population": population} if population else {})},
    }


def expert_scores(split: str) -> dict[str, float]:
    """Each expert on its own skill: the denominators of normalized accuracy."""
    out = {}
    for s in NAMES:
        task = load_tasks(SKILLS / "data" / s / f"{split}.jsonl")
        out[s] = evaluate_tasks(SKILLS / "models" / s, task)[task.name]
    return out


def normalized(scores: dict[str, float], experts: dict[str, float]) -> float:
    by_skill = {k.split("/")[0]: v for k, v in scores.items()}
    return sum(by_skill[s] / experts[s] for s in NAMES) / len(NAMES)


def exact_match_scorer(split: str, limit: int | None = None) -> Scorer:
    """Greedy exact match on the first ``limit`` prompts of each skill's ``split``."""
    terms = []
    for s in NAMES:
        task = load_tasks(SKILLS / "data" / s / f"{split}.jsonl", s)
        if limit is not None:
            task = type(task)(task.name, task.path, task.prompts[:limit], task.answers[:limit])
        terms.append(FitnessTerm(s, "tasks", 1.0, task))
    return Scorer(terms, str(SKILLS / "models" / "base"), str(SKILLS / "models" / "base"))


def curve(
    result, cfg, experts_test: dict[str, float], experts_val: dict[str, float], val: Scorer | None
) -> list[dict]:
    """Test (and val) normalized accuracy of the running best, at every evaluation that improved it.

    ``val``: where the fitness is not exact match (``metric: answer_prob``), the exact-match scorer of
    the search's val prompts; otherwise the candidates' own scores are that already."""
    merger = Merger()
    scorer = exact_match_scorer("test")
    rows, best = [], -1e9
    space = SearchSpace(cfg, 3)  # the skill models' 3 layers
    for c in result.candidates:
        if c.fitness <= best:
            continue
        best = c.fitness
        plan, tensors = merger.merge(space.to_config(c.x))
        test = scorer.score(plan, tensors)
        val_scores = val.score(plan, tensors) if val is not None else c.scores
        rows.append(
            {
                "evaluation": c.evaluation,
                "fitness": c.fitness,
                "val_normalized": normalized(val_scores, experts_val),
                "test_normalized": normalized(test, experts_test),
                "test": test,
            }
        )
        print(
            f"  eval {c.evaluation:>4}: val {rows[-1]['val_normalized']:.3f}  test {rows[-1]['test_normalized']:.3f}"
        )
    merger.close()
    return rows


def first_reaching(rows: list[dict], key: str, level: float) -> int | None:
    return next((r["evaluation"] for r in rows if r[key] >= level), None)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--method", default="ties")
    p.add_argument("--max-evals", type=int, default=300)
    p.add_argument("--limit", type=int, default=50, help="val prompts per skill per evaluation")
    p.add_argument("--granularity", type=int, default=1)
    p.add_argument("--filters", nargs="*", default=None)
    p.add_argument("--population", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--init-weight", type=float, default=1.0, help="start point (the hand-tuned TIES's)")
    p.add_argument("--init-density", type=float, default=0.2, help="start point (the hand-tuned TIES's)")
    p.add_argument("--init-lambda", type=float, default=1.5, help="start point (the hand-tuned TIES's)")
    p.add_argument(
        "--no-normalize", action="store_true", help="normalize: false (then lambda is not searched)"
    )
    p.add_argument(
        "--ray-evals", type=int, default=0, help="also compare Ray (2 workers) with serial on this many"
    )
    p.add_argument("--skip-search", action="store_true", help="only the Ray comparison")
    p.add_argument(
        "--metric",
        choices=("exact_match", "answer_prob"),
        default="exact_match",
        help="what the search scores on val (answer_prob: teacher-forced probability of the answer)",
    )
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    figures: dict = {"args": {k: str(v) for k, v in vars(args).items()}}
    init = {"weight": args.init_weight, "density": args.init_density}
    if not args.no_normalize:
        init["lambda"] = args.init_lambda
    raw = search_config(
        args.method,
        args.limit,
        args.granularity,
        args.filters,
        args.population,
        init,
        hand_tuned(args.out),
        not args.no_normalize,
        args.metric,
    )
    cfg = parse_search_config(raw)
    if not args.skip_search:
        t0 = time.perf_counter()
        result = search(cfg, args.out / "search", max_evals=args.max_evals, seed=args.seed, write_model=False)
        figures["search_wall_s"] = round(time.perf_counter() - t0, 1)
        experts_test, experts_val = expert_scores("test"), expert_scores("val")
        val = exact_match_scorer("val", args.limit) if args.metric != "exact_match" else None
        rows = curve(result, cfg, experts_test, experts_val, val)
        summary = json.loads((args.out / "search" / "summary.json").read_text())
        fresh = [c for c in result.candidates if not c.cached]
        figures.update(
            experts_test=experts_test,
            experts_val=experts_val,
            evaluations=len(result.candidates),
            best_evaluation=result.best.evaluation,
            best_val_normalized=rows[-1]["val_normalized"],
            best_fitness=result.best.fitness,
            best_test=result.held_out["best"],
            best_test_normalized=normalized(result.held_out["best"], experts_test),
            baseline_test_normalized=normalized(result.held_out["baseline"], experts_test),
            baseline_val_normalized=normalized(
                val.score(*Merger().merge(result.baseline_config)) if val else result.baseline_scores,
                experts_val,
            ),
            evals_to_test={str(v): first_reaching(rows, "test_normalized", v) for v in (0.5, 0.6, 0.65)},
            evals_to_val={str(v): first_reaching(rows, "val_normalized", v) for v in (0.5, 0.6, 0.65)},
            seconds_per_eval=summary["seconds_per_evaluation"],
            merge_share=sum(c.merge_s for c in fresh) / sum(c.merge_s + c.score_s for c in fresh),
            curve=rows,
        )
        print(json.dumps({k: v for k, v in figures.items() if k != "curve"}, indent=1))
    if args.ray_evals:
        walls = {}
        results = {}
        for mode in ("serial", "ray"):
            shutil.rmtree(args.out / mode, ignore_errors=True)
            t0 = time.perf_counter()
            results[mode] = search(
                cfg,
                args.out / mode,
                max_evals=args.ray_evals,
                seed=args.seed,
                workers=2 if mode == "ray" else 1,
                ray=mode == "ray",
                write_model=False,
                quiet=True,
            )
            walls[mode] = round(time.perf_counter() - t0, 1)
        same = [(c.x, c.fitness) for c in results["ray"].candidates] == [
            (c.x, c.fitness) for c in results["serial"].candidates
        ]
        figures["ray"] = {
            "evaluations": args.ray_evals,
            "wall_s": walls,
            "same_candidates_and_scores": same,
            "same_best_yml": (args.out / "ray" / "best.yml").read_text()
            == (args.out / "serial" / "best.yml").read_text(),
        }
        print(json.dumps(figures["ray"], indent=1))
    (args.out / "figures.json").write_text(json.dumps(figures, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
