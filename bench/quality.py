"""Merge quality on the shipped skill experts: sweep each method's main knobs on the validation split,
then report the chosen setting of each method on the test split.

    python bench/quality.py [--models examples/skills/models] [--data examples/skills/data]
                            [--val-limit 200] [--methods ties dare_ties ...] [--json FILE]

For every method, every setting of the grid below is merged (all experts; SLERP: the first two) and scored
by exact-match accuracy on each skill's validation prompts. The setting with the best normalized accuracy
(merged / expert, averaged over the skills in the merge) is then scored on the test split, next to the
base and the experts. Validation and test prompts are disjoint, so the test figures are not tuned on.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import tempfile
import time
from pathlib import Path

import mergesmith
from mergesmith.eval import evaluate_tasks, load_tasks

ROOT = Path(__file__).resolve().parent.parent / "examples" / "skills"

# method -> (knob grid, config builder). Knobs: weight/lambda (how much of the task vectors), density.
GRIDS = {
    "linear": {},
    "task_arithmetic": {"lambda": [0.4, 0.6, 0.8, 1.0, 1.2]},
    "ties": {"density": [0.1, 0.2, 0.4, 0.7], "lambda": [0.8, 1.0, 1.5, 2.0]},
    "dare_linear": {"density": [0.3, 0.5, 0.7], "lambda": [0.6, 0.8, 1.0]},
    "dare_ties": {"density": [0.3, 0.5, 0.7], "lambda": [0.8, 1.0, 1.5, 2.0]},
    "slerp": {"t": [0.3, 0.5, 0.7]},
}


def make_config(method: str, base: str, experts: list[str], knobs: dict[str, float]) -> dict:
    if method == "linear":
        return {
            "merge_method": "linear",
            "models": [{"model": e, "parameters": {"weight": 1.0}} for e in experts],
        }
    if method == "slerp":
        return {
            "merge_method": "slerp",
            "base_model": experts[0],
            "models": [{"model": experts[0]}, {"model": experts[1]}],
            "parameters": {"t": knobs["t"]},
        }
    per_model = {"weight": 1.0}
    if "density" in knobs:
        per_model["density"] = knobs["density"]
    return {
        "merge_method": method,
        "base_model": base,
        "models": [{"model": e, "parameters": dict(per_model)} for e in experts],
        "parameters": {"lambda": knobs["lambda"]},
    }


def settings(method: str) -> list[dict[str, float]]:
    grid = GRIDS[method]
    keys = list(grid)
    return [dict(zip(keys, values)) for values in itertools.product(*(grid[k] for k in keys))]


def merged_skills(method: str, names: list[str]) -> list[str]:
    """The skills a merge contains: SLERP merges the first two experts, the others all of them."""
    return names[:2] if method == "slerp" else names


def normalized(acc: dict[str, float], own: dict[str, float], skills: list[str]) -> float:
    ratios = [acc[s] / own[s] for s in skills if own[s] > 0]
    return sum(ratios) / len(ratios) if ratios else 0.0


def load_split(data: Path, names: list[str], split: str, limit: int):
    tasks = []
    for n in names:
        t = load_tasks(data / n / f"{split}.jsonl", name=n)
        if limit:
            t = type(t)(t.name, t.path, t.prompts[:limit], t.answers[:limit])
        tasks.append(t)
    return tasks


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", type=Path, default=ROOT / "models")
    ap.add_argument("--data", type=Path, default=ROOT / "data")
    ap.add_argument("--val-limit", type=int, default=200, help="validation prompts per skill (0 = all)")
    ap.add_argument("--test-limit", type=int, default=0, help="test prompts per skill (0 = all)")
    ap.add_argument("--methods", nargs="+", default=list(GRIDS), choices=list(GRIDS))
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args(argv)

    names = sorted(p.name for p in args.models.iterdir() if p.is_dir() and p.name != "base")
    base = str(args.models / "base")
    experts = [str(args.models / n) for n in names]
    val = load_split(args.data, names, "val", args.val_limit)
    test = load_split(args.data, names, "test", args.test_limit)
    t0 = time.perf_counter()

    def own_scores(tasks):
        return {n: evaluate_tasks(e, [t for t in tasks if t.name == n])[n] for n, e in zip(names, experts)}

    own_val = own_scores(val)
    results: dict = {"skills": names, "sweep": {}, "chosen": {}}
    with tempfile.TemporaryDirectory(prefix="mergesmith-quality-") as tmp:
        for method in args.methods:
            skills = merged_skills(method, names)
            best = None
            for knobs in settings(method):
                folder = Path(tmp) / method
                mergesmith.merge(
                    make_config(method, base, experts, knobs), folder, overwrite=True, quiet=True
                )
                acc = evaluate_tasks(str(folder), val)
                score = normalized(acc, own_val, skills)
                results["sweep"].setdefault(method, []).append(
                    {"knobs": knobs, "val": acc, "normalized": score}
                )
                label = ", ".join(f"{k}={v}" for k, v in knobs.items()) or "-"
                print(f"val  {method:16s} {label:24s} normalized {100 * score:5.1f}%", flush=True)
                if best is None or score > best[0]:
                    best = (score, knobs)
            results["chosen"][method] = {"knobs": best[1], "val_normalized": best[0]}

        rows = {"base": evaluate_tasks(base, test)}
        own_test = own_scores(test)
        rows["expert (own skill)"] = own_test
        for method in args.methods:
            knobs = results["chosen"][method]["knobs"]
            folder = Path(tmp) / method
            mergesmith.merge(make_config(method, base, experts, knobs), folder, overwrite=True, quiet=True)
            rows[method] = evaluate_tasks(str(folder), test)
            results["chosen"][method]["test"] = rows[method]
            skills = merged_skills(method, names)
            results["chosen"][method]["test_normalized"] = normalized(rows[method], own_test, skills)

    header = f"{'test split':34s}" + "".join(f"{n:>8s}" for n in names) + f"{'normalized':>12s}"
    print("\n" + header + "\n" + "-" * len(header))
    for label, acc in rows.items():
        cells = "".join(f"{100 * acc[n]:7.1f}%" if n in acc else f"{'':>8s}" for n in names)
        norm = ""
        chosen = results["chosen"].get(label)
        if chosen:
            norm = f"{100 * chosen['test_normalized']:11.1f}%"
            label += " " + ",".join(f"{k[0]}={v}" for k, v in chosen["knobs"].items())
        print(f"{label:34s}{cells}{norm}")
    print(
        f"\n{sum(len(v) for v in results['sweep'].values())} merges swept in {time.perf_counter() - t0:.0f} s"
    )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
