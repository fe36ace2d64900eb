"""How much the calibrated MoE's figures depend on which calibration prompts were drawn.

``bench/moe_quality.py`` builds each MoE from one draw of training prompts per expert (``--seed 0``).
This script builds the default calibrated MoE of ``examples/skills`` (two experts per token) from
several draws (seeds 0..``--draws``-1) and for each number of prompts per expert in ``--prompts``,
scores every build on the test split (or ``--split``) by greedy exact match, and prints each build's
per-skill accuracy, its normalized mean (each skill's accuracy / its expert's, averaged) and each
skill's normalized score, then the mean and the worst over the draws.

    PYTHONPATH=src python bench/moe_draws.py [--prompts 64 256] [--draws 4] [--split test] [--json F]

About 1 minute per build at 64 prompts, 1.3 at 256 (scoring 2,000 prompts is most of it), on one
thread of the shared 2-core machine. docs/moe.md ("How much the draw of prompts matters") has the
figures it printed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from moe_quality import ROOT, load_tasks, moe_config, skills_of, train_prompts
from transformers import AutoModelForCausalLM, AutoTokenizer

from mergesmith.eval import evaluate_tasks
from mergesmith.moe import build_moe


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--skills", type=Path, default=ROOT / "examples" / "skills")
    p.add_argument("--prompts", type=int, nargs="+", default=[64, 256], help="training prompts per expert")
    p.add_argument("--draws", type=int, default=4, help="draws of prompts (seeds 0..N-1) per prompt count")
    p.add_argument("--split", default="test", help="the split scored (default test)")
    p.add_argument("--work", type=Path, default=ROOT / ".bench-cache" / "moe-draws")
    p.add_argument("--json", type=Path, help="write every figure here")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    root: Path = args.skills
    skills = skills_of(root, None)
    tasks = {s: load_tasks(root / "data" / s / f"{args.split}.jsonl", s) for s in skills}
    experts = {s: evaluate_tasks(root / "models" / s, [tasks[s]])[s] for s in skills}
    print("experts:", "  ".join(f"{s} {experts[s]:.3f}" for s in skills), flush=True)
    rows: list[dict] = []
    for n in args.prompts:
        for seed in range(args.draws):
            prompts = {s: train_prompts(root, s, n, seed) for s in skills}
            out = args.work / f"p{n}-s{seed}"
            t0 = time.perf_counter()
            cfg = moe_config(root, skills, "calibrated", prompts, 2, root / "models" / "base")
            build_moe(cfg, out, overwrite=True, quiet=True)
            build_s = time.perf_counter() - t0
            model = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
            tokenizer = AutoTokenizer.from_pretrained(str(out))
            acc = {s: evaluate_tasks(model, [tasks[s]], tokenizer=tokenizer)[s] for s in skills}
            norm = {s: acc[s] / experts[s] for s in skills}
            row = {
                "prompts": n,
                "seed": seed,
                "build_s": round(build_s, 1),
                "accuracy": acc,
                "normalized": norm,
            }
            row["normalized_mean"] = statistics.fmean(norm.values())
            rows.append(row)
            print(
                f"{n:>4} prompts, draw {seed}: "
                + "  ".join(f"{s} {acc[s]:.3f} ({norm[s]:.3f})" for s in skills)
                + f"  normalized {row['normalized_mean']:.3f}  build {build_s:.1f} s",
                flush=True,
            )
    summary = {}
    for n in args.prompts:
        mine = [r for r in rows if r["prompts"] == n]
        summary[n] = {
            "normalized_mean": statistics.fmean(r["normalized_mean"] for r in mine),
            "normalized_worst": min(r["normalized_mean"] for r in mine),
            "skill_mean": {s: statistics.fmean(r["normalized"][s] for r in mine) for s in skills},
            "skill_worst": {s: min(r["normalized"][s] for r in mine) for s in skills},
        }
        got = summary[n]
        print(
            f"{n:>4} prompts, {len(mine)} draws: normalized mean {got['normalized_mean']:.3f} "
            f"(worst {got['normalized_worst']:.3f}); per skill, mean (worst): "
            + "  ".join(f"{s} {got['skill_mean'][s]:.3f} ({got['skill_worst'][s]:.3f})" for s in skills)
        )
    if args.json:
        args.json.write_text(
            json.dumps({"experts": experts, "builds": rows, "summary": summary}, indent=1) + "\n"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
