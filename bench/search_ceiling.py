"""How far can merge coefficients go on the shipped skill experts? An upper bound by gradient descent.

`mergesmith search` looks for per-layer merge coefficients by black-box search (CMA-ES over TIES
weights, densities and lambda). This script asks what such coefficients could reach at best: it
optimises them directly by gradient, AdaMerging-style, but on the labelled train split (a stronger
signal than AdaMerging's test-time entropy), and scores what it finds.

The merge is task arithmetic over the experts' task vectors, which live in the MLP weights only
(docs/skills.md): for each of the 9 MLP tensors t (3 layers x gate/up/down) and expert m,

    W_t = base_t + sum_m lambda[m, t] * (expert_m,t - base_t)

with the lambdas shared at four granularities:

* ``model``: one lambda per expert (4 numbers);
* ``layer``: one per expert and layer (12), the issue's per-layer space;
* ``tensor``: one per expert and MLP tensor (36);
* ``neuron``: one per expert and output row of each MLP tensor (26,112), far finer than any recipe
  the search offers; a near-oracle that tells how much the coefficients alone could do.

All lambdas start at 1.0 (plain task arithmetic, also scored as the start point) and are trained with
Adam (cosine-decayed learning rate) in batches that draw the same number of prompts from each skill's
``train.jsonl``, on one of two objectives over ``<bos> prompt answer <eos>`` rows (teacher forcing,
right padding, loss masked to the answer and ``<eos>``):

* ``nll``: the answer's summed cross-entropy, averaged over the batch;
* ``prob``: minus the mean probability of the whole answer, a smooth stand-in for exact match. The two
  disagree: the NLL is dominated by the worst-served prompts, so its optimum spreads the loss over all
  skills, while expected exact match is free to give up a skill entirely.

The merged weights enter the base model through ``torch.func.functional_call``, so only the lambdas
get gradients. Val and test are never used to train or to choose anything; the final lambdas are
scored, greedy exact match, on every skill's 200-prompt val and 500-prompt test splits. Normalized
accuracy is docs/skills.md's: merged accuracy / the expert's own accuracy on its skill (same split),
averaged over the skills.

    PYTHONPATH=src python bench/search_ceiling.py --out /tmp/ceiling/figures.json \\
        [--granularities model layer tensor neuron] [--objectives nll prob] [--steps 300] [--lr 0.05]
        [--bounds 0 2]

(about 7.5 minutes on one thread of the shared 2-core machine: ~52 s of training per row, 3 s to score.)
``--bounds 0 2`` keeps every lambda in the search's own range for weights (``allow_negative_weights:
false``), projecting after each step. docs/search.md ("How far per-layer coefficients can go") has the
figures it printed.

Prints a table and writes every figure (accuracies, losses, the learned lambdas or their summary,
runtimes) to ``--out``.
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from torch.func import functional_call
from transformers import AutoModelForCausalLM, AutoTokenizer

from mergesmith.eval import evaluate_tasks, load_tasks
from mergesmith.eval.tasks import TaskSet

ROOT = Path(__file__).resolve().parent.parent
SKILLS = ROOT / "examples" / "skills"
NAMES = ("count", "rev", "shift", "sort")
PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
GRANULARITIES = ("model", "layer", "tensor", "neuron")
State = dict[str, torch.Tensor]


def load_model(folder: Path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def mlp_names(model: torch.nn.Module) -> list[str]:
    layers = model.config.num_hidden_layers
    return [f"model.layers.{i}.mlp.{p}.weight" for i in range(layers) for p in PROJECTIONS]


def task_vectors(base: torch.nn.Module, experts: Sequence[torch.nn.Module], names: list[str]) -> State:
    """``{tensor: (experts, out, in)}`` stacked task vectors; checks the experts differ only there."""
    base_state = base.state_dict()
    for expert in experts:
        for key, value in expert.state_dict().items():
            if key not in names and not torch.equal(value, base_state[key]):
                raise SystemExit(
                    f"{key} differs from the base outside the MLPs; the merge assumes it doesn't"
                )
    return {n: torch.stack([e.state_dict()[n] - base_state[n] for e in experts]) for n in names}


class Coefficients(torch.nn.Module):
    """The lambdas of one granularity, expanded to a ``(experts, rows, 1)`` factor for every tensor."""

    def __init__(self, granularity: str, names: list[str], taus: State, experts: int) -> None:
        super().__init__()
        self.granularity = granularity
        self.names = names
        if granularity == "neuron":
            self.rows = torch.nn.ParameterList(
                torch.nn.Parameter(torch.ones(experts, taus[n].shape[1])) for n in names
            )
        else:
            groups = {"model": 1, "layer": len(names) // len(PROJECTIONS), "tensor": len(names)}[granularity]
            self.table = torch.nn.Parameter(torch.ones(experts, groups))

    def group(self, index: int) -> int:
        if self.granularity == "model":
            return 0
        if self.granularity == "layer":
            return index // len(PROJECTIONS)
        return index

    def factors(self) -> dict[str, torch.Tensor]:
        if self.granularity == "neuron":
            return {n: r[:, :, None] for n, r in zip(self.names, self.rows, strict=True)}
        return {n: self.table[:, self.group(i), None, None] for i, n in enumerate(self.names)}

    def count(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def report(self) -> dict:
        """The lambdas themselves (coarse granularities) or their per-tensor summary (neuron)."""
        if self.granularity != "neuron":
            return {"lambdas": [[round(float(x), 4) for x in row] for row in self.table.detach()]}
        summary = {}
        for n, r in zip(self.names, self.rows, strict=True):
            r = r.detach()
            summary[n] = {
                "mean": [round(float(x), 4) for x in r.mean(1)],
                "std": [round(float(x), 4) for x in r.std(1)],
                "min": [round(float(x), 4) for x in r.min(1).values],
                "max": [round(float(x), 4) for x in r.max(1).values],
            }
        return {"lambda_summary": summary}


def merged(base_state: State, taus: State, factors: dict[str, torch.Tensor]) -> State:
    return {n: base_state[n] + (factors[n] * taus[n]).sum(0) for n in taus}


def encode(tokenizer, prompt: str, answer: str) -> tuple[list[int], list[int]]:
    """``<bos> prompt answer <eos>`` ids and labels, the loss on the answer and ``<eos>`` only."""
    p = tokenizer(prompt)["input_ids"]
    a = tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return p + a, [-100] * len(p) + a


def batch_tensors(rows: Sequence[tuple[list[int], list[int]]], pad: int) -> dict[str, torch.Tensor]:
    """Right-padded batch: positions count from the real first token, pads are masked out."""
    width = max(len(ids) for ids, _ in rows)
    ids = torch.tensor([r + [pad] * (width - len(r)) for r, _ in rows])
    labels = torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r, _ in rows])
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def answer_nll(model: torch.nn.Module, params: State, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Each answer's summed negative log-likelihood (answer tokens + ``<eos>``), one per row."""
    logits = functional_call(
        model,
        params,
        args=(),
        kwargs={"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]},
    ).logits
    targets = batch["labels"][:, 1:]
    logp = torch.log_softmax(logits[:, :-1], dim=-1)
    keep = targets != -100
    picked = logp.gather(-1, targets.clamp(min=0)[..., None])[..., 0]
    return -(picked * keep).sum(1)


def objective(nll: torch.Tensor, kind: str) -> torch.Tensor:
    """``nll``: mean answer NLL; ``prob``: minus the mean probability of the whole answer, a smooth
    stand-in for exact match (what sampling would score), closer to the figure reported."""
    return nll.mean() if kind == "nll" else -torch.exp(-nll).mean()


def read_pairs(path: Path) -> list[tuple[str, str]]:
    lines = (json.loads(line) for line in path.read_text().splitlines() if line.strip())
    return [(r["prompt"], r["answer"]) for r in lines]


@torch.no_grad()
def eval_loss(model, params_fn, encoded: Sequence[tuple[list[int], list[int]]], pad: int) -> dict[str, float]:
    """Teacher-forced figures on ``encoded``: mean answer NLL and mean answer probability."""
    params = params_fn()
    nll = torch.cat(
        [
            answer_nll(model, params, batch_tensors(encoded[i : i + 200], pad))
            for i in range(0, len(encoded), 200)
        ]
    )
    return {"nll": round(float(nll.mean()), 4), "prob": round(float(torch.exp(-nll).mean()), 4)}


def score(model: torch.nn.Module, state: State, tokenizer, splits: dict[str, list[TaskSet]]) -> dict:
    """Exact match of ``model`` with ``state`` loaded, ``{split: {skill: accuracy}}``."""
    model.load_state_dict(state, strict=False)
    return {
        split: {k.split("/")[0]: v for k, v in evaluate_tasks(model, sets, tokenizer=tokenizer).items()}
        for split, sets in splits.items()
    }


def normalized(acc: dict[str, float], expert: dict[str, float]) -> float:
    return sum(acc[s] / expert[s] for s in NAMES) / len(NAMES)


def train(
    granularity: str,
    kind: str,
    model: torch.nn.Module,
    base_state: State,
    taus: State,
    names: list[str],
    train_sets: dict[str, list],
    val_encoded: list,
    args: argparse.Namespace,
    pad: int,
) -> tuple[Coefficients, list[dict]]:
    """Adam on the lambdas of one granularity, cosine-decayed learning rate; returns them and a curve."""
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    coeffs = Coefficients(granularity, names, taus, len(NAMES))
    opt = torch.optim.Adam(coeffs.parameters(), lr=args.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=args.steps)
    per_skill = args.batch // len(NAMES)

    def params() -> State:
        return merged(base_state, taus, coeffs.factors())

    curve = [{"step": 0, **{f"val_{k}": v for k, v in eval_loss(model, params, val_encoded, pad).items()}}]
    running = 0.0
    for step in range(1, args.steps + 1):
        rows = [row for s in NAMES for row in rng.sample(train_sets[s], per_skill)]
        nll = answer_nll(model, params(), batch_tensors(rows, pad))
        loss = objective(nll, kind)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if args.bounds is not None:  # projected: the lambdas stay in the search's range
            with torch.no_grad():
                for p in coeffs.parameters():
                    p.clamp_(*args.bounds)
        sched.step()
        running += nll.mean().item()
        if step % args.log_every == 0 or step == args.steps:
            n = step % args.log_every or args.log_every
            val = eval_loss(model, params, val_encoded, pad)
            point = {
                "step": step,
                "train_nll": round(running / n, 4),
                "val_nll": val["nll"],
                "val_prob": val["prob"],
            }
            running = 0.0
            curve.append(point)
            print(
                f"  [{granularity}/{kind}] step {step}: train nll {point['train_nll']:.3f}, "
                f"val nll {val['nll']:.3f}, val p(answer) {val['prob']:.3f}"
            )
    return coeffs, curve


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, required=True, help="JSON file for every figure")
    parser.add_argument("--models", type=Path, default=SKILLS / "models")
    parser.add_argument("--data", type=Path, default=SKILLS / "data")
    parser.add_argument("--granularities", nargs="+", choices=GRANULARITIES, default=list(GRANULARITIES))
    parser.add_argument(
        "--objectives",
        nargs="+",
        choices=("nll", "prob"),
        default=["nll", "prob"],
        help="nll: mean answer NLL; prob: mean probability of the whole answer (closer to exact match)",
    )
    parser.add_argument(
        "--bounds",
        type=float,
        nargs=2,
        metavar=("LO", "HI"),
        help="keep every lambda in [LO, HI] (projected after each step); 0 2 is the search's weight range",
    )
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--lr", type=float, default=0.05, help="Adam's peak learning rate (cosine decay)")
    parser.add_argument("--batch", type=int, default=64, help="prompts per step, the same number per skill")
    parser.add_argument("--log-every", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (one is fastest here)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()

    tokenizer = AutoTokenizer.from_pretrained(args.models / "base")
    base = load_model(args.models / "base")
    experts = [load_model(args.models / s) for s in NAMES]
    names = mlp_names(base)
    taus = task_vectors(base, experts, names)
    base_state = {k: v.clone() for k, v in base.state_dict().items()}
    for p in base.parameters():
        p.requires_grad_(False)
    scorer = copy.deepcopy(base)  # the model the merged weights are loaded into for generation

    pad = tokenizer.pad_token_id
    train_sets = {
        s: [encode(tokenizer, p, a) for p, a in read_pairs(args.data / s / "train.jsonl")] for s in NAMES
    }
    val_encoded = [encode(tokenizer, p, a) for s in NAMES for p, a in read_pairs(args.data / s / "val.jsonl")]
    splits = {
        split: [load_tasks(args.data / s / f"{split}.jsonl") for s in NAMES] for split in ("val", "test")
    }

    figures: dict = {"settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}}
    t0 = time.perf_counter()
    expert_acc: dict[str, dict[str, float]] = {"val": {}, "test": {}}
    for s, expert in zip(NAMES, experts, strict=True):
        for split, sets in splits.items():
            task = sets[NAMES.index(s)]
            expert_acc[split][s] = next(iter(evaluate_tasks(expert, [task], tokenizer=tokenizer).values()))
    figures["expert_accuracy"] = expert_acc
    figures["expert_eval_s"] = round(time.perf_counter() - t0, 1)
    print(
        "experts on their own skill (test): "
        + ", ".join(f"{s} {100 * expert_acc['test'][s]:.1f}" for s in NAMES)
        + f"  [{figures['expert_eval_s']}s]"
    )

    results: dict[str, dict] = {}

    def record(label: str, coeffs: Coefficients, extra: dict) -> None:
        t = time.perf_counter()
        with torch.no_grad():
            state = merged(base_state, taus, coeffs.factors())
        acc = score(scorer, state, tokenizer, splits)
        results[label] = {
            "params": coeffs.count(),
            "accuracy": acc,
            "normalized": {split: round(normalized(acc[split], expert_acc[split]), 4) for split in acc},
            "eval_s": round(time.perf_counter() - t, 1),
            **extra,
            **coeffs.report(),
        }
        r = results[label]
        print(
            f"{label}: val norm {r['normalized']['val']:.3f}, test norm {r['normalized']['test']:.3f}, test "
            + " ".join(f"{s} {100 * acc['test'][s]:.1f}" for s in NAMES)
            + f"  [eval {r['eval_s']}s]"
        )

    start = Coefficients("model", names, taus, len(NAMES))
    val = eval_loss(base, lambda: merged(base_state, taus, start.factors()), val_encoded, pad)
    record("start (TA lambda=1)", start, {"val_nll": val["nll"], "val_prob": val["prob"], "train_s": 0.0})
    for kind in args.objectives:
        for g in args.granularities:
            t = time.perf_counter()
            coeffs, curve = train(g, kind, base, base_state, taus, names, train_sets, val_encoded, args, pad)
            train_s = round(time.perf_counter() - t, 1)
            last = curve[-1]
            extra = {
                "val_nll": last["val_nll"],
                "val_prob": last["val_prob"],
                "curve": curve,
                "train_s": train_s,
            }
            record(f"{g} / {kind}", coeffs, extra)

    figures["results"] = results
    figures["total_s"] = round(time.perf_counter() - t_start, 1)
    header = f"{'lambdas / objective':<22}{'#params':>8}{'val nll':>9}{'val p':>7}{'val norm':>10}{'test norm':>10}"
    header += "".join(f"{s:>8}" for s in NAMES) + f"{'train s':>9}"
    print("\n" + header)
    for label, r in results.items():
        line = f"{label:<22}{r['params']:>8}{r['val_nll']:>9.3f}{r['val_prob']:>7.3f}"
        line += f"{r['normalized']['val']:>10.3f}{r['normalized']['test']:>10.3f}"
        line += "".join(f"{100 * r['accuracy']['test'][s]:>8.1f}" for s in NAMES)
        line += f"{r['train_s']:>9.1f}"
        print(line)
    print(
        "(val nll / val p: teacher-forced answer NLL and probability on the val split; per-skill columns: "
        f"test exact match, %; total {figures['total_s']}s)"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(figures, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
