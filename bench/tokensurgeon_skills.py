"""tokensurgeon on the shipped skill models: exact-match accuracy with a perturbed donor tokenizer.

The donor is the skill base model with its tokenizer perturbed two ways: every id shuffled, and new tokens
that each merge two characters into one (the ``--n-pairs`` commonest letter pairs of the test prompts),
added to the donor's tokenizer. A model trained with that tokenizer would have rows for them; as a
stand-in, the donor's row of each is the mean of its rows of the two characters. For two skill models this
measures, on the test split (``mergesmith.eval``'s exact match, and the teacher-forced negative
log-likelihood of the right answer):

* the original model with its own tokenizer;
* the model after ``tokensurgeon`` with a donor that only shuffles ids (must equal the original);
* the model after ``tokensurgeon`` with the perturbed donor, rows of the new tokens by OMP (default), the
  mean row and zeros, with the donor's tokenizer: on all prompts and on those holding a new token (the
  model never saw one token stand for two characters).

    PYTHONPATH=src nice -n 5 python bench/tokensurgeon_skills.py [--n 500] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from mergesmith.eval import evaluate_tasks, load_tasks
from mergesmith.eval.tasks import TaskSet
from mergesmith.tokens import transplant_tokenizer

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
import tiny_models as tm  # noqa: E402

SKILLS = ROOT / "examples" / "skills"


def perturbed_donor(base: Path, out: Path, pairs: list[str], seed: int) -> Path:
    """``base`` with its token ids shuffled and ``pairs`` added as tokens whose rows are the mean of
    their two characters' rows (embedding and lm_head)."""
    shutil.copytree(base, out)
    tok = json.loads((out / "tokenizer.json").read_text())
    vocab: dict[str, int] = tok["model"]["vocab"]
    n = len(vocab)
    perm = list(range(n))
    random.Random(seed).shuffle(perm)
    tm.renumber_tokens(tok, perm)
    for j, p in enumerate(pairs):
        tok["added_tokens"].append(
            {
                "id": n + j,
                "content": p,
                "single_word": False,
                "lstrip": False,
                "rstrip": False,
                "normalized": False,
                "special": False,
            }
        )
    (out / "tokenizer.json").write_text(json.dumps(tok))
    tm.renumber_configs(out, perm, n + len(pairs))
    tensors = load_file(out / "model.safetensors")
    index = torch.tensor(perm)
    for k in ("model.embed_tokens.weight", "lm_head.weight"):
        v = tensors[k]
        moved = torch.empty_like(v)
        moved[index] = v
        new = [(v[vocab[p[0]]].float() + v[vocab[p[1]]].float()) / 2 for p in pairs]
        tensors[k] = torch.cat([moved, torch.stack(new).to(v.dtype)]) if new else moved
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    return out


def affected(tasks: TaskSet, pairs: list[str]) -> TaskSet:
    """The prompts that hold one of ``pairs`` (the only ones the new tokens change)."""
    keep = [i for i, p in enumerate(tasks.prompts) if any(x in p for x in pairs)]
    return TaskSet(
        tasks.name, tasks.path, tuple(tasks.prompts[i] for i in keep), tuple(tasks.answers[i] for i in keep)
    )


def commonest_pairs(tasks: list[TaskSet], n: int) -> list[str]:
    counts: Counter[str] = Counter()
    for t in tasks:
        for p in t.prompts:
            body = p.split(": ", 1)[-1]
            counts.update(body[i : i + 2] for i in range(len(body) - 1) if body[i : i + 2].isalpha())
    return [p for p, _ in counts.most_common(n)]


@torch.no_grad()
def answer_nll(folder: Path, tasks: TaskSet) -> float:
    """Mean negative log-likelihood (nats per answer) of the right answer and <eos> after each prompt,
    teacher-forced: comparable between models that share a tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    total = 0.0
    for prompt, answer in zip(tasks.prompts, tasks.answers):
        p = tok(prompt)["input_ids"]
        a = tok(answer, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        ids = torch.tensor([p + a])
        logp = model(ids).logits[0, len(p) - 1 : -1].log_softmax(-1)
        total -= float(logp[torch.arange(len(a)), torch.tensor(a)].sum())
    return total / max(1, len(tasks.prompts))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--skills", nargs="+", default=["rev", "sort"])
    ap.add_argument("--n", type=int, default=200, help="test prompts per skill")
    ap.add_argument(
        "--pairs", nargs="+", help="two-character tokens to add (default: the commonest letter pairs)"
    )
    ap.add_argument("--n-pairs", type=int, default=8, help="how many of the commonest letter pairs to add")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(1)
    t0 = time.time()
    tasks = {}
    for s in args.skills:
        full = load_tasks(SKILLS / "data" / s / "test.jsonl")
        tasks[s] = TaskSet(full.name, full.path, full.prompts[: args.n], full.answers[: args.n])
    pairs = args.pairs or commonest_pairs(list(tasks.values()), args.n_pairs)
    results: dict[str, dict[str, float]] = {}
    counts: dict[str, int] = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        base = SKILLS / "models" / "base"
        shuffled = perturbed_donor(base, root / "donor-shuffled", [], seed=0)
        donor = perturbed_donor(base, root / "donor", pairs, seed=0)
        for s in args.skills:
            model = SKILLS / "models" / s
            row = {"original": next(iter(evaluate_tasks(model, tasks[s]).values()))}
            out = transplant_tokenizer(model, shuffled, root / f"{s}-shuffled", quiet=True)
            row["ids shuffled"] = next(iter(evaluate_tasks(out, tasks[s]).values()))
            hit = affected(tasks[s], pairs)
            row["original, on prompts with a new token"] = next(iter(evaluate_tasks(model, hit).values()))
            for init in ("omp", "mean", "zero"):
                out = transplant_tokenizer(model, donor, root / f"{s}-{init}", init=init, quiet=True)
                row[f"{init}: all"] = next(iter(evaluate_tasks(out, tasks[s]).values()))
                row[f"{init}: with a new token"] = next(iter(evaluate_tasks(out, hit).values()))
                row[f"{init}: answer NLL, with a new token"] = answer_nll(out, hit)
            counts[s] = len(hit.prompts)
            results[s] = row
    cols = list(next(iter(results.values())))
    print(f"donor: base tokenizer, ids shuffled, new tokens {pairs!r}; {args.n} test prompts per skill")
    print("prompts with a new token: " + ", ".join(f"{s} {n}" for s, n in counts.items()))
    print("| skill | " + " | ".join(cols) + " |")
    print("|---" * (len(cols) + 1) + "|")
    for s, row in results.items():
        print(f"| {s} | " + " | ".join(f"{row[c]:.3f}" for c in cols) + " |")
    print(f"({time.time() - t0:.0f} s)")
    if args.json:
        args.json.write_text(
            json.dumps({"pairs": pairs, "n": args.n, "affected": counts, "accuracy": results}, indent=2)
        )


if __name__ == "__main__":
    main()
