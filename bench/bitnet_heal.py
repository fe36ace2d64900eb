"""``mergesmith bitnet --heal`` on the shipped skill experts: accuracy in float, ternarised, and healed.

For each expert of ``examples/skills`` (a float-trained character-level Llama fine-tuned on one skill):

1. its exact-match accuracy on its skill's test split, in float;
2. after ``mergesmith bitnet EXPERT OUT`` (absmean ternarisation after training: post-training
   quantisation, which the command warns about);
3. after ``mergesmith bitnet EXPERT OUT --heal N --heal-data TEXT`` for a few ``N``: N steps of
   quantisation-aware distillation from the float expert on windows of TEXT, here the skill's
   training prompts and answers (``rev: abc=cba rev: ...``).

Accuracy is ``mergesmith.eval.evaluate_tasks``: exact match of the greedy continuation on the test split,
with the model loaded by transformers from the exported folder (``AutoBitLinear``, int8 activations).

    PYTHONPATH=src python bench/bitnet_heal.py [--skills examples/skills] [--steps 100 400 1000]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch._dynamo

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from mergesmith import cli  # noqa: E402


def read_jsonl(path: Path) -> list[tuple[str, str]]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [(r["prompt"], r["answer"]) for r in rows]


def accuracy(folder: Path, test: Path) -> float:
    """Exact match of greedy continuations on ``test`` (the project's scorer, ``mergesmith.eval``)."""
    from mergesmith.eval import evaluate_tasks

    return next(iter(evaluate_tasks(folder, test, batch_size=250).values()))


def bitnet(model: Path, out: Path, *extra: str) -> float:
    """Run ``mergesmith bitnet``; returns the seconds it took."""
    start = time.perf_counter()
    if not out.exists():
        assert cli.main(["bitnet", str(model), str(out), *extra]) == 0
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--skills", type=Path, default=ROOT / "examples" / "skills")
    p.add_argument("--experts", nargs="*", help="expert names (default: every model but the base)")
    p.add_argument("--steps", type=int, nargs="+", default=[100, 400, 1000])
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--cache", type=Path, default=ROOT / ".bench-cache" / "bitnet_heal")
    args = p.parse_args()
    torch.set_num_threads(1)
    torch._dynamo.config.disable = True  # transformers' BitNet kernels run eagerly (no 20 s compile)
    models = args.skills / "models"
    experts = args.experts or sorted(d.name for d in models.iterdir() if d.is_dir() and d.name != "base")
    args.cache.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in experts:
        expert, data = models / name, args.skills / "data" / name
        test = data / "test.jsonl"
        text = args.cache / f"{name}-train.txt"
        text.write_text(" ".join(p + a for p, a in read_jsonl(data / "train.jsonl")))
        row = {"expert": name, "float": accuracy(expert, test)}
        bitnet(expert, args.cache / f"{name}-ptq")
        row["ternarised"] = accuracy(args.cache / f"{name}-ptq", test)
        for n in args.steps:
            out = args.cache / f"{name}-heal{n}"
            extra = ["--heal", str(n), "--heal-data", str(text), "--heal-lr", str(args.lr)]
            secs = bitnet(expert, out, *extra, "--heal-seq", str(args.seq))
            row[f"heal {n}"] = accuracy(out, test)
            row[f"heal {n} s"] = secs
        rows.append(row)
        print(json.dumps(row), flush=True)
    (args.cache / "results.json").write_text(json.dumps(rows, indent=2))
    cols = ["float", "ternarised", *(f"heal {n}" for n in args.steps)]
    print("| expert | " + " | ".join(cols) + " |")
    print("| --- | " + " | ".join("---" for _ in cols) + " |")
    for row in rows:
        print(f"| {row['expert']} | " + " | ".join(f"{row[c]:.3f}" for c in cols) + " |")


if __name__ == "__main__":
    main()
