"""Where the calibrated MoE of the shipped skill experts loses accuracy: routing overridden per layer.

Builds the default calibrated MoE of ``examples/skills`` (as ``bench/moe_quality.py`` does: 64 training
prompts per expert, two experts per token) and scores it on the validation split with the built model's
routing overridden by hooks on its Mixtral routers:

* ``oracle layers L``: in layers L every token goes to its skill's expert (weight 1);
* ``oracle layer 0, BOS only`` / ``other tokens only``: the same in layer 0 for the BOS (whose router
  input is the same in every prompt) or for every token but the BOS;
* ``BOS to expert X``: the BOS goes to expert X in layer 0, whatever the skill;
* ``every token to X in layer 0``: every token of every skill goes to expert X in layer 0 (layers 1
  and 2 as the routers say): which skill the model performs then.

    PYTHONPATH=src python bench/moe_layer0.py [--limit 200] [--work DIR]

docs/moe.md ("Where sort's loss is, split up") has the figures it printed. The val split is used so that
the test split stays unseen by anything this script suggests.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path

import torch
from moe_quality import ROOT, load_tasks, moe_config, skills_of, train_prompts
from transformers import AutoModelForCausalLM, AutoTokenizer

from mergesmith.eval import evaluate_tasks
from mergesmith.moe import build_moe

#: a router input within this of the BOS's (max abs difference) is the BOS's
BOS_MATCH = 1e-4


def bos_inputs(model, tokenizer) -> list[torch.Tensor]:
    """Each layer's router input at a lone BOS (the same at the start of every prompt)."""
    found: dict[int, torch.Tensor] = {}
    hooks = [
        layer.mlp.register_forward_pre_hook(
            lambda _m, args, i=i: found.__setitem__(i, args[0].reshape(-1, args[0].shape[-1])[0].clone())
        )
        for i, layer in enumerate(model.model.layers)
    ]
    try:
        with torch.no_grad():
            model(input_ids=torch.tensor([[tokenizer.bos_token_id]]))
    finally:
        for h in hooks:
            h.remove()
    return [found[i] for i in range(len(found))]


@contextlib.contextmanager
def forced(model, layers: list[int], expert: int, rows: str, bos: list[torch.Tensor]) -> Iterator[None]:
    """Route the tokens ``rows`` names ("all", "bos", "other") to ``expert`` with weight 1 in ``layers``."""
    gates = [model.model.layers[i].mlp.gate for i in layers]
    for i, gate in zip(layers, gates):
        route = type(gate).forward

        def forward(hidden, gate=gate, i=i, route=route):
            logits, scores, index = route(gate, hidden)
            flat = hidden.reshape(-1, hidden.shape[-1])
            is_bos = (flat - bos[i]).abs().amax(-1) < BOS_MATCH
            take = {"all": torch.ones_like(is_bos), "bos": is_bos, "other": ~is_bos}[rows]
            scores, index = scores.clone(), index.clone()
            index[take, 0] = expert
            index[take, 1:] = (expert + 1) % gate.num_experts
            scores[take] = 0
            scores[take, 0] = 1
            return logits, scores, index

        gate.forward = forward
    try:
        yield
    finally:
        for gate in gates:
            del gate.forward


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--skills", type=Path, default=ROOT / "examples" / "skills")
    p.add_argument("--limit", type=int, default=200, help="validation prompts per skill (default 200)")
    p.add_argument("--work", type=Path, default=ROOT / ".bench-cache" / "moe-layer0")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    torch.set_num_threads(2)
    root: Path = args.skills
    skills = skills_of(root, None)
    prompts = {s: train_prompts(root, s, 64, args.seed) for s in skills}
    out = args.work / "moe"
    build_moe(
        moe_config(root, skills, "calibrated", prompts, 2, root / "models" / "base"),
        out,
        overwrite=True,
        quiet=True,
    )
    model = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(out))
    bos = bos_inputs(model, tokenizer)
    tasks = {}
    for s in skills:
        t = load_tasks(root / "data" / s / "val.jsonl", s)
        tasks[s] = type(t)(t.name, t.path, t.prompts[: args.limit], t.answers[: args.limit])
    n_layers = len(model.model.layers)

    def score(label: str, override=None) -> None:
        row = {}
        for e, s in enumerate(skills):
            with override(e) if override else contextlib.nullcontext():
                row.update(evaluate_tasks(model, [tasks[s]], tokenizer=tokenizer))
        cells = "  ".join(f"{s} {row[s]:.3f}" for s in skills)
        print(f"{label:34s} {cells}  mean {sum(row.values()) / len(row):.3f}", flush=True)

    score("default")
    for layers in ([0], list(range(1, n_layers)), list(range(n_layers))):
        score(
            f"oracle layers {','.join(map(str, layers))}",
            lambda e, ls=layers: forced(model, ls, e, "all", bos),
        )
    score("oracle layer 0, BOS only", lambda e: forced(model, [0], e, "bos", bos))
    score("oracle layer 0, other tokens only", lambda e: forced(model, [0], e, "other", bos))
    for x, s in enumerate(skills):
        score(f"BOS to expert {s} in layer 0", lambda _e, x=x: forced(model, [0], x, "bos", bos))
    for x, s in enumerate(skills):
        score(f"every token to {s} in layer 0", lambda _e, x=x: forced(model, [0], x, "all", bos))
    return 0


if __name__ == "__main__":
    sys.exit(main())
