"""How well an MoE of the shipped skill experts routes and answers, against its experts and a TIES merge.

For the models in ``examples/skills/models`` (a base and one fine-tune per skill) and their data in
``examples/skills/data/<skill>/{train,val,test}.jsonl`` this

* builds MoEs of the experts with ``mergesmith moe`` (gate modes hidden, hidden_avg, cheap_embed and
  calibrated), each expert prompted with ``--prompts`` prompts drawn from its skill's training split;
* measures routing on the held-out test prompts, per layer, through the built model's own router
  (transformers' ``router_logits``): the fraction of a skill's test prompts whose top-1 expert at the last
  prompt token is that skill's expert ("last"), the same over every prompt token ("tokens") and over the
  reference answer's tokens fed after the prompt ("answer"), and the mean top-1 router probability (1/E
  is a flat router, 1 a one-hot one);
* scores exact-match accuracy (greedy generation, ``mergesmith.eval``) per skill of the base, each expert,
  each MoE and a TIES merge of the same experts (``mergesmith.merge``; the best of a grid of densities and
  lambdas on the validation split);
* scores the ceiling of any router: for each skill, the trunk (base or TIES merge) with that skill's
  expert's feed-forward blocks in every layer ("oracle routing": what an MoE on that trunk computes when
  every token goes to the right expert);
* builds the calibrated MoE as it was before answer tokens were calibration samples
  (``calibration: {max_new_tokens: 0, shrinkage: ledoit_wolf}``), and reports every build's time;
* builds calibrated MoEs with other ``calibration.target_top1`` values (``--targets``: the temperature),
  with ``calibration.tokens: last`` and with one expert per token, on the TIES trunk, and with the
  prompt pass on the base alone (``calibration.trunk: base``);
* builds MoEs on a merged trunk: ``base_model`` set to the TIES merge, so attention, norms and embeddings
  are the merge's and the feed-forward blocks the experts' own (``--no-trunk`` skips this).

    PYTHONPATH=src python bench/moe_quality.py [--skills examples/skills] [--json results.json]

It needs the skill models and ``mergesmith.eval`` (exact-match scoring), which come with the skills
work; docs/moe.md has the figures it printed.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

import mergesmith
from mergesmith.moe import build_moe

ROOT = Path(__file__).resolve().parent.parent


def load_tasks(path: Path, name: str | None = None):
    from mergesmith.eval import load_tasks as load

    return load(path, name)


def evaluate_tasks(model_dir: Path, tasks: list) -> dict[str, float]:
    from mergesmith.eval import evaluate_tasks as evaluate

    return evaluate(model_dir, tasks)


MOE_MODES = ("hidden", "hidden_avg", "cheap_embed", "calibrated")
TIES_GRID = [(d, lam) for d in (0.2, 0.3, 0.5, 0.7) for lam in (1.0, 1.5, 2.0, 2.5)]  # (density, lambda)


def skills_of(root: Path, wanted: Sequence[str] | None) -> list[str]:
    found = sorted(
        p.name
        for p in (root / "models").iterdir()
        if p.is_dir() and p.name != "base" and (root / "data" / p.name / "test.jsonl").is_file()
    )
    if wanted:
        missing = set(wanted) - set(found)
        if missing:
            sys.exit(f"moe_quality: no model or data for {sorted(missing)} in {root}")
        return list(wanted)
    return found


def train_prompts(root: Path, skill: str, n: int, seed: int) -> list[str]:
    prompts = list(load_tasks(root / "data" / skill / "train.jsonl").prompts)
    return random.Random(f"{seed}-{skill}").sample(prompts, min(n, len(prompts)))


def moe_config(
    root: Path, skills: list[str], mode: str, prompts: dict[str, list[str]], k: int, trunk: Path
) -> dict:
    return {
        "base_model": str(trunk),
        "gate_mode": mode,
        "experts_per_token": k,
        "dtype": "float32",
        "experts": [
            {"source_model": str(root / "models" / s), "positive_prompts": prompts[s]} for s in skills
        ],
    }


def ties_config(root: Path, skills: list[str], density: float, lam: float) -> dict:
    return {
        "merge_method": "ties",
        "base_model": str(root / "models" / "base"),
        "models": [
            {"model": str(root / "models" / s), "parameters": {"weight": 1.0, "density": density}}
            for s in skills
        ],
        "parameters": {"lambda": lam},
        "dtype": "float32",
    }


@torch.no_grad()
def routing(model_dir: Path, pairs_by_skill: dict[str, list[tuple[str, str]]], skills: list[str]) -> dict:
    """Per layer, per skill: the share of test prompts whose last prompt token's top-1 expert is the
    skill's ("last"), the same over every ordinary prompt token ("tokens") and over the answer's tokens
    ("answer": the reference answer fed after the prompt, as generation feeds the expert's own), and the
    mean top-1 probability over prompt tokens ("top1")."""
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    special = torch.tensor(sorted(set(tok.all_special_ids)))
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    layers = model.config.num_hidden_layers
    out: dict[str, dict[str, list[float]]] = {}
    for expert, skill in enumerate(skills):
        sums = {k: [0.0] * layers for k in ("last", "tokens", "answer", "top1")}
        n_prompt = n_answer = 0
        pairs = pairs_by_skill[skill]
        for start in range(0, len(pairs), 128):
            chunk = pairs[start : start + 128]
            prompts = [tok(p)["input_ids"] for p, _ in chunk]
            answers = [tok(a, add_special_tokens=False)["input_ids"] for _, a in chunk]
            width = max(len(p) + len(a) for p, a in zip(prompts, answers))
            ids = torch.full((len(chunk), width), pad)
            mask = torch.zeros_like(ids)
            is_answer = torch.zeros_like(ids, dtype=torch.bool)
            last = torch.zeros(len(chunk), dtype=torch.long)
            for row, (p, a) in enumerate(zip(prompts, answers)):  # left padding
                seq = p + a
                ids[row, width - len(seq) :] = torch.tensor(seq)
                mask[row, width - len(seq) :] = 1
                is_answer[row, width - len(a) :] = True
                last[row] = width - len(a) - 1
            res = model(input_ids=ids, attention_mask=mask, output_router_logits=True)
            ordinary = mask.bool() & ~torch.isin(ids, special)
            prompt_tokens = ordinary & ~is_answer
            answer_tokens = ordinary & is_answer
            n_prompt += int(prompt_tokens.sum())
            n_answer += int(answer_tokens.sum())
            rows = torch.arange(len(chunk))
            for layer, logits in enumerate(res.router_logits):
                probs = logits.float().softmax(-1).reshape(*ids.shape, -1)
                right = probs.argmax(-1) == expert
                sums["last"][layer] += float(right[rows, last].sum())
                sums["tokens"][layer] += float((right & prompt_tokens).sum())
                sums["answer"][layer] += float((right & answer_tokens).sum())
                sums["top1"][layer] += float(probs.max(-1).values[prompt_tokens].sum())
        out[skill] = {
            "last": [x / len(pairs) for x in sums["last"]],
            "tokens": [x / n_prompt for x in sums["tokens"]],
            "answer": [x / max(n_answer, 1) for x in sums["answer"]],
            "top1": [x / n_prompt for x in sums["top1"]],
        }
    return out


def oracle_model(trunk: Path, expert_dir: Path, out: Path) -> Path:
    """``trunk`` with the expert's feed-forward weights in every layer: an MoE whose router is always right
    (single-file checkpoints only)."""
    import shutil

    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(trunk, out)
    base = load_file(str(out / "model.safetensors"))
    expert = load_file(str(expert_dir / "model.safetensors"))
    mixed = {k: expert[k] if ".mlp." in k else v for k, v in base.items()}
    save_file(mixed, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def accuracy(
    model_dir: Path, root: Path, skills: list[str], split: str, limit: int | None
) -> dict[str, float]:
    tasks = []
    for s in skills:
        t = load_tasks(root / "data" / s / f"{split}.jsonl", name=s)
        if limit:
            t = type(t)(t.name, t.path, t.prompts[:limit], t.answers[:limit])
        tasks.append(t)
    return evaluate_tasks(model_dir, tasks)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--skills", type=Path, default=ROOT / "examples" / "skills", help="skills folder")
    p.add_argument("--only", nargs="*", help="skills to use (default: all with a model and data)")
    p.add_argument("--prompts", type=int, default=64, help="training prompts per expert (default 64)")
    p.add_argument("--experts-per-token", type=int, default=2)
    p.add_argument("--modes", nargs="*", default=list(MOE_MODES))
    p.add_argument(
        "--targets",
        nargs="*",
        type=float,
        default=[0.5, 0.9, 0.99],
        help="extra calibrated MoEs with these calibration.target_top1 (default 0.5 0.9 0.99; 0.97 is the default)",
    )
    p.add_argument("--limit", type=int, help="test examples per skill (default: all)")
    p.add_argument("--work", type=Path, default=ROOT / ".bench-cache" / "moe", help="where models are built")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-trunk", action="store_true", help="skip the MoEs on a TIES-merged trunk")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", type=Path, help="write every figure here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    root: Path = args.skills
    skills = skills_of(root, args.only)
    args.work.mkdir(parents=True, exist_ok=True)
    prompts = {s: train_prompts(root, s, args.prompts, args.seed) for s in skills}
    test_pairs = {}
    for s in skills:
        t = load_tasks(root / "data" / s / "test.jsonl")
        test_pairs[s] = list(zip(t.prompts, t.answers))[: args.limit]
    results: dict = {"skills": skills, "prompts_per_expert": args.prompts, "k": args.experts_per_token}
    t0 = time.perf_counter()

    def tick(what: str) -> None:
        print(f"# {what} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)

    acc: dict[str, dict[str, float]] = {}
    acc["base"] = accuracy(root / "models" / "base", root, skills, "test", args.limit)
    for s in skills:
        acc[f"expert {s}"] = accuracy(root / "models" / s, root, skills, "test", args.limit)
    tick("base and experts scored")

    val: dict[str, float] = {}
    for density, lam in TIES_GRID:
        out = args.work / f"ties-{density}-{lam}"
        mergesmith.merge(ties_config(root, skills, density, lam), out, overwrite=True, quiet=True)
        scores = accuracy(out, root, skills, "val", args.limit)
        val[f"density {density}, lambda {lam}"] = sum(scores.values()) / len(scores)
    best = max(val, key=lambda k: val[k])
    ties = args.work / ("ties-" + best.removeprefix("density ").replace(", lambda ", "-"))
    acc[f"TIES ({best})"] = accuracy(ties, root, skills, "test", args.limit)
    results["ties_val"] = val
    tick("TIES merges scored")

    trunks: list[tuple[str, Path]] = [("base", root / "models" / "base")]
    if not args.no_trunk:
        trunks.append(("TIES trunk", ties))
    for trunk_name, trunk in trunks:
        acc[f"oracle routing, {trunk_name} + own expert MLP"] = {
            s: accuracy(
                oracle_model(trunk, root / "models" / s, args.work / f"oracle-{s}"),
                root,
                [s],
                "test",
                args.limit,
            )[s]
            for s in skills
        }
    tick("oracles scored")

    # (label, gate mode, trunk, config overrides)
    variants: list[tuple[str, str, Path, dict]] = [(f"{m}, base", m, trunks[0][1], {}) for m in args.modes]
    if "calibrated" in args.modes:  # the calibrated router before answer tokens were calibration samples
        variants.append(
            (
                "calibrated on prompt tokens only, base",
                "calibrated",
                trunks[0][1],
                {"calibration": {"max_new_tokens": 0, "shrinkage": "ledoit_wolf"}},
            )
        )
    last_trunk_name, last_trunk = trunks[-1]
    if not args.no_trunk:
        variants += [(f"{m}, TIES trunk", m, ties, {}) for m in ("hidden", "calibrated") if m in args.modes]
    variants += [
        (
            f"calibrated target {t}, {last_trunk_name}",
            "calibrated",
            last_trunk,
            {"calibration": {"target_top1": t}},
        )
        for t in args.targets
    ]
    if "calibrated" in args.modes:
        variants.append(
            (
                "calibrated, prompt pass on the base only, base",
                "calibrated",
                trunks[0][1],
                {"calibration": {"trunk": "base"}},
            )
        )
    variants += [
        (
            f"calibrated last tokens only, {last_trunk_name}",
            "calibrated",
            last_trunk,
            {"calibration": {"tokens": "last"}},
        ),
        (f"calibrated k=1, {last_trunk_name}", "calibrated", last_trunk, {"experts_per_token": 1}),
    ]
    results["routing"] = {}
    for label, mode, trunk, overrides in variants:
        out = args.work / ("moe-" + label.replace(", ", "-").replace(" ", "_"))
        config = {**moe_config(root, skills, mode, prompts, args.experts_per_token, trunk), **overrides}
        started = time.perf_counter()
        build_moe(config, out, overwrite=True, quiet=True)
        results.setdefault("build_seconds", {})[label] = time.perf_counter() - started
        results["routing"][label] = routing(out, test_pairs, skills)
        acc[f"MoE {label}"] = accuracy(out, root, skills, "test", args.limit)
        tick(f"MoE {label} built and scored")
    results["accuracy"] = acc
    print_tables(results, skills)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


def print_tables(results: dict, skills: list[str]) -> None:
    print("\n## Routing accuracy on held-out test prompts (top-1 expert = the skill's expert)\n")
    print("| gate mode | layer | last prompt token | prompt tokens | answer tokens | mean top-1 prob |")
    print("|---|---|---|---|---|---|")
    for mode, by_skill in results["routing"].items():
        layers = len(next(iter(by_skill.values()))["last"])
        for layer in range(layers):
            mean = {
                key: sum(by_skill[s][key][layer] for s in skills) / len(skills)
                for key in ("last", "tokens", "answer", "top1")
            }
            print(
                f"| {mode} | {layer} | {mean['last']:.3f} | {mean['tokens']:.3f} | {mean['answer']:.3f} "
                f"| {mean['top1']:.3f} |"
            )
    print("\n## Answer-token routing per skill (layers 0, 1, ...)\n")
    for mode, by_skill in results["routing"].items():
        if mode.startswith("calibrated"):
            cells = ", ".join(f"{s} " + "/".join(f"{x:.2f}" for x in by_skill[s]["answer"]) for s in skills)
            print(f"- {mode}: {cells}")
    print("\n## Exact-match accuracy on the test split\n")
    print("| model | " + " | ".join(skills) + " | mean |")
    print("|---|" + "---|" * (len(skills) + 1))
    for name, scores in results["accuracy"].items():
        row = [scores.get(s, float("nan")) for s in skills]
        print(f"| {name} | " + " | ".join(f"{x:.3f}" for x in row) + f" | {sum(row) / len(row):.3f} |")
    experts = {s: results["accuracy"].get(f"expert {s}", {}).get(s) for s in skills}
    if all(experts.values()):
        print("\n## Exact match normalised by each skill's expert (MoE / expert)\n")
        for name, scores in results["accuracy"].items():
            if name.startswith(("MoE", "TIES", "oracle")):
                row = [scores.get(s, float("nan")) / experts[s] for s in skills]  # type: ignore[operator]
                cells = " | ".join(f"{x:.3f}" for x in row)
                print(f"| {name} | {cells} | {sum(row) / len(row):.3f} |")
    for label, seconds in results.get("build_seconds", {}).items():
        print(f"build time, {label}: {seconds:.1f} s")
    print(
        "\nTIES validation mean accuracy: "
        + ", ".join(f"{k}: {v:.3f}" for k, v in results["ties_val"].items())
    )
    print("Oracle rows score each skill with its own expert's feed-forward blocks on the trunk: the ceiling")
    print("of an MoE on that trunk whose router is always right.")


if __name__ == "__main__":
    sys.exit(main())
