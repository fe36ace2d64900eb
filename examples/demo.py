"""The main job: merge the shipped tiny skill experts with several methods and show what each keeps.

    python examples/demo.py [--out out/demo] [--limit N]

Every expert is a fine-tune of one small base model on one skill (examples/skills). Each merge method
combines all experts into one model (SLERP: the first two); the table shows each merged model's exact-match
accuracy on each skill's held-out test split, next to the expert's own accuracy and the base's, and the
normalized accuracy: merged / expert, averaged over the skills the merge contains.

Progress goes to stderr: one line per merge and per evaluation, with its time, and a bar while a model is
evaluated. The table goes to stdout.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from tqdm import tqdm

import mergesmith

ROOT = Path(__file__).resolve().parent / "skills"

# Settings chosen on the validation split by bench/quality.py (docs/skills.md has its table).
METHODS = {
    "linear": lambda base, experts: {
        "merge_method": "linear",
        "models": [{"model": e, "parameters": {"weight": 1.0}} for e in experts],
    },
    "task_arithmetic": lambda base, experts: {
        "merge_method": "task_arithmetic",
        "base_model": base,
        "models": [{"model": e, "parameters": {"weight": 1.0}} for e in experts],
        "parameters": {"lambda": 1.0},
    },
    "ties": lambda base, experts: {
        "merge_method": "ties",
        "base_model": base,
        "models": [{"model": e, "parameters": {"weight": 1.0, "density": 0.2}} for e in experts],
        "parameters": {"lambda": 1.5},
    },
    "dare_ties": lambda base, experts: {
        "merge_method": "dare_ties",
        "base_model": base,
        "models": [{"model": e, "parameters": {"weight": 1.0, "density": 0.7}} for e in experts],
        "parameters": {"lambda": 0.8},
    },
    "slerp (first two)": lambda base, experts: {
        "merge_method": "slerp",
        "base_model": experts[0],
        "models": [{"model": experts[0]}, {"model": experts[1]}],
        "parameters": {"t": 0.3},
    },
}


def skills() -> list[str]:
    names = sorted(p.name for p in (ROOT / "models").iterdir() if p.is_dir() and p.name != "base")
    if not names:
        raise SystemExit(f"no expert models in {ROOT / 'models'}; run examples/skills/train.py")
    return names


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


class Steps:
    """'[ 3/15] ...' prefixes: how far the demo is."""

    def __init__(self, total: int) -> None:
        self.total, self.done = total, 0

    def next(self) -> str:
        self.done += 1
        return f"[{self.done:2d}/{self.total}]"


def evaluate(label: str, model: str, tasks: Sequence, step: str) -> dict[str, float]:
    """Exact-match accuracy of ``model`` on each task (as ``evaluate_tasks``), with a bar while it runs
    and one line with the time when done."""
    from mergesmith.eval.loading import load_model
    from mergesmith.eval.tasks import score_task

    start = time.perf_counter()
    prompts = sum(len(t) for t in tasks)
    with tqdm(
        total=prompts,
        desc=f"{step} evaluating {label}",
        unit="prompt",
        file=sys.stderr,
        leave=False,
        mininterval=0,  # one frame per batch of prompts (a batch takes a good part of a second)
    ) as bar:
        loaded, tokenizer = load_model(model)
        scores = {t.name: score_task(loaded, tokenizer, t, on_batch=bar.update).accuracy for t in tasks}
    say(f"{step} evaluated {label} on {prompts} prompts in {time.perf_counter() - start:.1f} s")
    return scores


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("out/demo"), help="where the merged models go")
    ap.add_argument(
        "--limit",
        type=int,
        default=200,
        help="score the first N test prompts per skill (default 200; 0 = all)",
    )
    ap.add_argument("--split", default="test", help="which data split to score (default test)")
    args = ap.parse_args()

    names = skills()
    base = str(ROOT / "models" / "base")
    experts = [str(ROOT / "models" / n) for n in names]
    t0 = time.perf_counter()
    say(
        f"demo: {len(METHODS)} merges of {len(names)} experts ({', '.join(names)}), each evaluated on "
        f"{args.limit or 'all'} {args.split} prompts per skill; loading torch and transformers ..."
    )
    from mergesmith.eval import load_tasks

    # transformers' model classes, now, not in step 1; evaluation runs these small models on one torch
    # thread (mergesmith.core.threads: two were 6-10x slower on a busy 2-core machine, same answers)
    importlib.import_module("mergesmith.eval.loading")

    tasks = []
    for n in names:
        t = load_tasks(ROOT / "data" / n / f"{args.split}.jsonl", name=n)
        if args.limit:
            t = type(t)(t.name, t.path, t.prompts[: args.limit], t.answers[: args.limit])
        tasks.append(t)

    steps = Steps(1 + len(names) + 2 * len(METHODS))
    rows: dict[str, dict[str, float]] = {"base": evaluate("base", base, tasks, steps.next())}
    own = {
        n: evaluate(f"expert {n}", e, [t for t in tasks if t.name == n], steps.next())[n]
        for n, e in zip(names, experts)
    }
    rows["expert (own skill)"] = own
    merged_skills: dict[str, list[str]] = {}
    for method, make in METHODS.items():
        cfg = make(base, experts)
        folder = args.out / method.split()[0]
        step, start = steps.next(), time.perf_counter()
        mergesmith.merge(cfg, folder, overwrite=True, quiet=True)
        say(f"{step} merged {method} into {folder} in {time.perf_counter() - start:.1f} s")
        rows[method] = evaluate(method, str(folder), tasks, steps.next())
        merged_skills[method] = names[:2] if method.startswith("slerp") else names
    print(format_table(names, rows, own, merged_skills))
    print(
        f"\n{len(METHODS)} merges of {len(names)} experts, evaluated in {time.perf_counter() - t0:.0f} s; "
        f"models in {args.out}"
    )
    return 0


def format_table(names, rows, own, merged_skills) -> str:
    header = f"{'model':20s}" + "".join(f"{n:>10s}" for n in names) + f"{'normalized':>12s}"
    lines = [header, "-" * len(header)]
    for label, acc in rows.items():
        cells = "".join(f"{100 * acc[n]:9.1f}%" if n in acc else f"{'':>10s}" for n in names)
        norm = ""
        if label in merged_skills:
            ratios = [acc[n] / own[n] for n in merged_skills[label] if own[n] > 0]
            norm = f"{100 * sum(ratios) / len(ratios):11.1f}%"
        lines.append(f"{label:20s}{cells}{norm}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
