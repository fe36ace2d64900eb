"""The main job: merge the shipped tiny skill experts with several methods and show what each keeps.

    python examples/demo.py [--out out/demo] [--limit N]

Every expert is a fine-tune of one small base model on one skill (examples/skills). Each merge method
combines all experts into one model (SLERP: the first two); the table shows each merged model's exact-match
accuracy on each skill's held-out test split, next to the expert's own accuracy and the base's, and the
normalized accuracy: merged / expert, averaged over the skills the merge contains.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import mergesmith
from mergesmith.eval import evaluate_tasks, load_tasks

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
    tasks = []
    for n in names:
        t = load_tasks(ROOT / "data" / n / f"{args.split}.jsonl", name=n)
        if args.limit:
            t = type(t)(t.name, t.path, t.prompts[: args.limit], t.answers[: args.limit])
        tasks.append(t)

    t0 = time.perf_counter()
    rows: dict[str, dict[str, float]] = {"base": evaluate_tasks(base, tasks)}
    own = {n: evaluate_tasks(e, [t for t in tasks if t.name == n])[n] for n, e in zip(names, experts)}
    rows["expert (own skill)"] = own
    merged_skills: dict[str, list[str]] = {}
    for method, make in METHODS.items():
        cfg = make(base, experts)
        folder = args.out / method.split()[0]
        mergesmith.merge(cfg, folder, overwrite=True, quiet=True)
        rows[method] = evaluate_tasks(str(folder), tasks)
        merged_skills[method] = names[:2] if method.startswith("slerp") else names
    print(format_table(names, rows, own, merged_skills))
    print(
        f"\n{len(METHODS)} merges of {len(names)} experts, evaluated in {time.perf_counter() - t0:.0f} s; models in {args.out}"
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
