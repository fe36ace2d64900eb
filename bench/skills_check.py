"""Check that the shipped skill models can show merging: experts good, base poor, merges in between.

For the models in ``examples/skills/models`` this measures

* exact-match accuracy of the base and of each expert on every skill's test split;
* each expert's task vector size, ``||expert - base|| / ||base||`` over all parameters, and the cosine
  similarity between task vectors (near zero means the skills barely compete for the same weights);
* two reference merges written here in a few lines, independent of the merge engine: task arithmetic
  (``base + lam * sum(expert - base)``) and TIES (trim each task vector to its largest ``density``
  share per tensor, elect a sign per weight by summed delta, average the agreeing deltas).

It exits non-zero when a figure falls short (an expert under ``--min-expert``, the base over
``--max-base``, or the best TA or TIES merge not above the base by ``--min-gain`` on every skill), so it
doubles as a check of the shipped models.

    PYTHONPATH=src python bench/skills_check.py [--json results.json]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer, LlamaForCausalLM

from mergesmith.eval import evaluate_tasks, load_tasks
from mergesmith.eval.tasks import TaskSet

ROOT = Path(__file__).resolve().parent.parent
SKILLS_DIR = ROOT / "examples" / "skills"
State = dict[str, torch.Tensor]


def load_state(folder: Path) -> State:
    return {k: v.float() for k, v in load_file(str(folder / "model.safetensors")).items()}


def deltas(base: State, expert: State) -> State:
    return {k: expert[k] - base[k] for k in base}


def global_norm(state: State) -> float:
    return math.sqrt(sum(float(v.double().pow(2).sum()) for v in state.values()))


def cosine(a: State, b: State) -> float:
    dot = sum(float((a[k].double() * b[k].double()).sum()) for k in a)
    return dot / (global_norm(a) * global_norm(b))


def task_arithmetic(base: State, vectors: Sequence[State], lam: float) -> State:
    """``base + lam * sum(task vectors)``: the plainest merge, the one the others improve upon."""
    return {k: base[k] + lam * sum(v[k] for v in vectors) for k in base}


def trim(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the ``density`` share of entries with the largest magnitude, zero the rest."""
    keep = max(1, int(round(density * delta.numel())))
    if keep >= delta.numel():
        return delta
    threshold = delta.abs().flatten().kthvalue(delta.numel() - keep + 1).values
    return torch.where(delta.abs() >= threshold, delta, torch.zeros_like(delta))


def ties(base: State, vectors: Sequence[State], density: float, lam: float) -> State:
    """TIES: trim, elect the sign with the larger total mass, average only the deltas that agree."""
    merged = {}
    for k in base:
        stacked = torch.stack([trim(v[k], density) for v in vectors])
        sign = torch.sign(stacked.sum(dim=0))
        agree = (torch.sign(stacked) == sign) & (stacked != 0)
        count = agree.sum(dim=0).clamp(min=1)
        merged[k] = base[k] + lam * (stacked * agree).sum(dim=0) / count
    return merged


def model_from_state(template: Path, state: State) -> LlamaForCausalLM:
    model = LlamaForCausalLM.from_pretrained(template, dtype=torch.float32)
    model.load_state_dict(state)
    return model.eval()


def score(model: LlamaForCausalLM, tokenizer: object, tasks: Sequence[TaskSet]) -> dict[str, float]:
    return {k.split("/")[0]: v for k, v in evaluate_tasks(model, tasks, tokenizer=tokenizer).items()}


def row(label: str, accs: dict[str, float]) -> str:
    cells = "".join(f"{100 * a:>8.1f}" for a in accs.values())
    return f"{label:<22}{cells}{100 * sum(accs.values()) / len(accs):>8.1f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", type=Path, default=SKILLS_DIR / "models")
    parser.add_argument("--data", type=Path, default=SKILLS_DIR / "data")
    parser.add_argument("--split", default="test")
    parser.add_argument("--lambdas", type=float, nargs="+", default=[0.5, 0.7, 0.8, 1.0])
    parser.add_argument("--densities", type=float, nargs="+", default=[0.2, 0.4])
    parser.add_argument("--ties-lambdas", type=float, nargs="+", default=[1.0, 1.5, 2.0])
    parser.add_argument("--min-expert", type=float, default=0.95)
    parser.add_argument("--max-base", type=float, default=0.05)
    parser.add_argument("--min-gain", type=float, default=0.05)
    parser.add_argument("--json", type=Path, help="also write every figure to this JSON file")
    args = parser.parse_args(argv)
    # One thread: the models are 128 wide, too small to split, and on a busy 2-core machine two threads
    # made the evaluations several times slower (the same answers either way).
    torch.set_num_threads(1)
    t0 = time.perf_counter()

    skills = sorted(p.name for p in args.data.iterdir() if (p / f"{args.split}.jsonl").is_file())
    tasks = [load_tasks(args.data / s / f"{args.split}.jsonl") for s in skills]
    tokenizer = AutoTokenizer.from_pretrained(args.models / "base")
    base_dir = args.models / "base"
    base = load_state(base_dir)
    vectors = {s: deltas(base, load_state(args.models / s)) for s in skills}
    base_norm = global_norm(base)

    figures: dict[str, object] = {"skills": skills, "accuracy": {}, "relative_norm": {}, "cosine": {}}
    acc: dict[str, dict[str, float]] = figures["accuracy"]  # type: ignore[assignment]
    print(f"{'model':<22}" + "".join(f"{s:>8}" for s in skills) + f"{'mean':>8}")
    acc["base"] = score(model_from_state(base_dir, base), tokenizer, tasks)
    print(row("base", acc["base"]))
    for s in skills:
        acc[f"expert:{s}"] = score(LlamaForCausalLM.from_pretrained(args.models / s), tokenizer, tasks)
        print(row(f"expert:{s}", acc[f"expert:{s}"]))
    vec_list = [vectors[s] for s in skills]
    for lam in args.lambdas:
        label = f"ta lam={lam:g}"
        acc[label] = score(model_from_state(base_dir, task_arithmetic(base, vec_list, lam)), tokenizer, tasks)
        print(row(label, acc[label]))
    for density in args.densities:
        for lam in args.ties_lambdas:
            label = f"ties k={density:g} lam={lam:g}"
            merged = ties(base, vec_list, density, lam)
            acc[label] = score(model_from_state(base_dir, merged), tokenizer, tasks)
            print(row(label, acc[label]))

    print("\nrelative task-vector norm ||expert - base|| / ||base||:")
    for s in skills:
        figures["relative_norm"][s] = global_norm(vectors[s]) / base_norm  # type: ignore[index]
        print(f"  {s:<8}{figures['relative_norm'][s]:.4f}")  # type: ignore[index]
    print("cosine similarity between task vectors:")
    for i, a in enumerate(skills):
        for b in skills[i + 1 :]:
            figures["cosine"][f"{a}/{b}"] = c = cosine(vectors[a], vectors[b])  # type: ignore[index]
            print(f"  {a}/{b}: {c:+.3f}")

    failures = check(acc, skills, args)
    figures["seconds"] = round(time.perf_counter() - t0, 1)
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    for failure in failures:
        print(f"FAIL: {failure}", file=sys.stderr)
    print(f"\n{'ok' if not failures else 'FAILED'} in {figures['seconds']}s")
    return 1 if failures else 0


def check(acc: dict[str, dict[str, float]], skills: Sequence[str], args: argparse.Namespace) -> list[str]:
    """The properties the shipped models promise, as messages for each one that does not hold."""
    failures = []
    for s in skills:
        if acc[f"expert:{s}"][s] < args.min_expert:
            failures.append(f"expert {s} scores {acc[f'expert:{s}'][s]:.3f} on its own skill")
        if acc["base"][s] > args.max_base:
            failures.append(f"base scores {acc['base'][s]:.3f} on {s}")
    for kind in ("ta ", "ties "):
        merges = {k: v for k, v in acc.items() if k.startswith(kind)}
        best = max(merges, key=lambda k: sum(merges[k].values()))
        short = [s for s in skills if merges[best][s] < acc["base"][s] + args.min_gain]
        if short:
            failures.append(
                f"best {kind.strip()} merge ({best}) does not beat the base on {', '.join(short)}"
            )
    return failures


if __name__ == "__main__":
    raise SystemExit(main())
