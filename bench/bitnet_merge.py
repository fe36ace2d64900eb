"""Merging ternary (BitNet b1.58) models: merge the latent weights then ternarise, or merge the ternary ones?

Builds everything on the CPU, seeded, in a cache folder (reused on later runs):

1. a tiny Llama (hidden 128, 2 layers; one token per letter and per task tag) trained **ternary from
   scratch**: quantisation-aware training, every linear layer of the decoder blocks a ``QATLinear`` at
   full strength (absmean ternary weights, int8 activations, straight-through backward). Its training
   mix: generic tasks on six letters (``<cpy>``, ``<swp>``, ``<shl>``, ``<dup>``) and the two skills
   under long tags (``<rot:text>``, ``<shr:text>``), as a base model has read an operation described
   in words;
2. two ternary fine-tunes of it (QAT from the base's latent weights, SGD with momentum, half of each
   batch replaying the pre-training mix), each teaching one short tag the base never saw: ``<rot>``
   (each letter shifted by one, z -> a) and ``<shr>`` (rotate right by one);
3. every model kept twice: its latent float weights (a plain checkpoint) and its BitNet export
   (``mergesmith bitnet``: packed codes + scale, what one ships);
4. merges of the two fine-tunes, every output written with ``--out-format bitnet``:
   (i) **latent**: merge the latent checkpoints, then ternarise (what docs/bitnet.md recommends);
   (ii) **ternary**: merge the packed BitNet checkpoints (read as ``gamma * W~``), then re-ternarise;
   and the other naive choice, (iii) picking one expert.

Every model is scored through transformers (``AutoModelForCausalLM.from_pretrained`` of the packed
checkpoint: ``AutoBitLinear``, int8 activations) by greedy exact match on 400 test prompts per skill
and 100 per generic task.

    PYTHONPATH=src python bench/bitnet_merge.py [--cache .bench-cache/bitnet_merge] [--fresh]
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import shutil
import string
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch._dynamo
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

import mergesmith  # noqa: E402
from mergesmith import cli  # noqa: E402
from mergesmith.bitnet.heal import finish_qat, prepare_qat, set_strength  # noqa: E402

LETTERS = string.ascii_lowercase
WIDTH = 6  # letters per operand; every prompt is "<tag> xxxxxx =" and every answer WIDTH letters

GENERIC: dict[str, Callable[[str], str]] = {
    "cpy": lambda x: x,
    "swp": lambda x: x[3:] + x[:3],
    "shl": lambda x: x[1:] + x[0],
    "dup": lambda x: x[:3] + x[:3],
}
SKILLS: dict[str, Callable[[str], str]] = {
    "rot": lambda x: "".join(LETTERS[(LETTERS.index(c) + 1) % 26] for c in x),
    "shr": lambda x: x[-1] + x[:-1],
}
# The base learns each skill under a long tag ("<rot:text>", as a base model has read an operation
# described in words); an expert learns to do it when asked with the short tag ("<rot>"), which the
# base never saw. The fine-tune then mostly routes a new tag to a circuit the base already has.
TEXT = {f"{k}:text": v for k, v in SKILLS.items()}
TASKS = {**GENERIC, **SKILLS, **TEXT}
PRETRAIN = [*GENERIC, *TEXT]
# one token per letter, one per task tag (so a tag's embedding row belongs to its task), "=" and padding
VOCAB = ["<pad>", *LETTERS, "=", *(f"<{t}>" for t in TASKS)]
IDS = {c: i for i, c in enumerate(VOCAB)}


@dataclass(frozen=True)
class Recipe:
    seed: int = 0
    hidden: int = 128
    intermediate: int = 256
    layers: int = 2
    heads: int = 4
    batch: int = 64
    base_steps: int = 3000
    base_lr: float = 3e-3
    ft_steps: int = 300
    ft_lr: float = 3e-3  # SGD with momentum 0.9: updates scale with the gradient, so fine-tunes stay small
    ft_momentum: float = 0.9
    replay: float = 0.5  # fraction of each fine-tune batch drawn from the pre-training mix
    n_test: int = 400


# --- data -----------------------------------------------------------------------------------------


def example(task: str, rng: random.Random) -> tuple[list[str], str]:
    x = "".join(rng.choice(LETTERS) for _ in range(WIDTH))
    return [f"<{task}>", *x, "="], TASKS[task](x)


def encode(rows: list[list[str]]) -> torch.Tensor:
    return torch.tensor([[IDS[c] for c in row] for row in rows], dtype=torch.long)


def batch(tasks: list[str], n: int, rng: random.Random) -> torch.Tensor:
    pairs = [example(rng.choice(tasks), rng) for _ in range(n)]
    return encode([p + list(a) for p, a in pairs])


def test_set(task: str, n: int, seed: int) -> tuple[torch.Tensor, list[str]]:
    rng = random.Random(f"test-{task}-{seed}")
    pairs = [example(task, rng) for _ in range(n)]
    return encode([p for p, _ in pairs]), [a for _, a in pairs]


# --- models ---------------------------------------------------------------------------------------


def llama(r: Recipe):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=len(VOCAB),
        hidden_size=r.hidden,
        intermediate_size=r.intermediate,
        num_hidden_layers=r.layers,
        num_attention_heads=r.heads,
        num_key_value_heads=r.heads,
        max_position_embeddings=32,
        tie_word_embeddings=False,
        pad_token_id=0,
        bos_token_id=None,
        eos_token_id=None,
    )
    torch.manual_seed(r.seed)
    return LlamaForCausalLM(cfg)


def answer_loss(model, ids: torch.Tensor) -> torch.Tensor:
    """Cross-entropy on the answer letters only (the last WIDTH positions)."""
    logits = model(ids[:, :-1]).logits[:, -WIDTH:]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, -WIDTH:].reshape(-1))


def train(model, sample: Callable[[int], torch.Tensor], steps: int, opt, label: str, sched=None) -> None:
    """``steps`` optimiser steps on the QAT model (ternary forward at full strength)."""
    model.train()
    start = time.perf_counter()
    for step in range(steps):
        loss = answer_loss(model, sample(step))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if sched is not None:
            sched.step()
        if step % 200 == 0 or step == steps - 1:
            print(f"  {label} step {step:5d}  loss {loss.item():.4f}  {time.perf_counter() - start:.0f}s")
    model.eval()


def train_base(r: Recipe, folder: Path) -> None:
    """Ternary from scratch: AdamW with a one-cycle schedule on the pre-training mix."""
    model = llama(r)
    prepare_qat(model)
    set_strength(model, 1.0)
    rng = random.Random(f"base-{r.seed}")
    opt = torch.optim.AdamW(model.parameters(), lr=r.base_lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=r.base_lr, total_steps=r.base_steps, pct_start=0.05
    )
    train(model, lambda _: batch(PRETRAIN, r.batch, rng), r.base_steps, opt, "base", sched)
    save_latent(model, folder)


def fine_tune(r: Recipe, base: Path, skill: str, folder: Path) -> None:
    """A ternary fine-tune (QAT from the base's latent weights) on the short-tag skill, with replay."""
    model = load_qat(base)
    rng = random.Random(f"{skill}-{r.seed}")
    n_replay = int(r.batch * r.replay)

    def sample(_: int) -> torch.Tensor:
        return torch.cat([batch([skill], r.batch - n_replay, rng), batch(PRETRAIN, n_replay, rng)])

    opt = torch.optim.SGD(model.parameters(), lr=r.ft_lr, momentum=r.ft_momentum)
    train(model, sample, r.ft_steps, opt, skill)
    save_latent(model, folder)


def save_latent(qat_model, folder: Path) -> None:
    """The latent float weights as a plain checkpoint (what merges of latent weights read)."""
    plain = finish_qat(copy.deepcopy(qat_model))
    plain.save_pretrained(folder)


def load_qat(folder: Path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    prepare_qat(model)
    set_strength(model, 1.0)
    return model


def export_bitnet(latent: Path, out: Path) -> Path:
    """``mergesmith bitnet LATENT OUT`` (the model was trained ternary, so nothing is lost)."""
    if not out.exists():
        assert cli.main(["bitnet", str(latent), str(out)]) == 0
    return out


# --- evaluation -----------------------------------------------------------------------------------


@torch.no_grad()
def accuracy(model, task: str, n: int) -> float:
    """Greedy exact match on ``n`` test prompts of ``task`` (all prompts have the same length)."""
    prompts, answers = test_set(task, n, 0)
    ids = prompts
    for _ in range(WIDTH):
        nxt = model(ids).logits[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, nxt], dim=1)
    got = ["".join(VOCAB[i] for i in row[-WIDTH:].tolist()) for row in ids]
    return sum(g == a for g, a in zip(got, answers)) / len(answers)


def evaluate_folder(folder: Path, n: int) -> dict[str, float]:
    """Load a (ternary) checkpoint with transformers and score it on both skills and the generic tasks."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    scores = {task: accuracy(model, task, n) for task in SKILLS}
    scores["generic"] = sum(accuracy(model, t, n // 4) for t in GENERIC) / len(GENERIC)
    return scores


# --- the experiment ----------------------------------------------------------------------------------


def build_models(cache: Path, r: Recipe) -> dict[str, Path]:
    """Base and the two fine-tunes, latent and packed; trained once and cached."""
    paths = {"base": cache / "base-latent"}
    if not paths["base"].exists():
        train_base(r, paths["base"])
    for skill in SKILLS:
        paths[skill] = cache / f"{skill}-latent"
        if not paths[skill].exists():
            fine_tune(r, paths["base"], skill, paths[skill])
    for name in list(paths):
        paths[f"{name}-bitnet"] = export_bitnet(paths[name], cache / f"{name}-bitnet")
    return paths


def merge_configs(base: str, experts: list[str]) -> dict[str, dict]:
    """The merges compared: each is run on the latent checkpoints and on the packed ones."""

    def task_arithmetic(lam: float) -> dict:
        return {
            "merge_method": "task_arithmetic",
            "base_model": base,
            "models": [{"model": e, "parameters": {"weight": 1.0}} for e in experts],
            "parameters": {"lambda": lam},
        }

    return {
        "linear (average)": {
            "merge_method": "linear",
            "models": [{"model": e, "parameters": {"weight": 0.5}} for e in experts],
        },
        "task_arithmetic lambda=1": task_arithmetic(1.0),
        "task_arithmetic lambda=0.7": task_arithmetic(0.7),
        "ties density=0.5": {
            "merge_method": "ties",
            "base_model": base,
            "models": [{"model": e, "parameters": {"weight": 1.0, "density": 0.5}} for e in experts],
            "parameters": {"normalize": False},
        },
    }


def run(cache: Path, r: Recipe) -> list[dict]:
    paths = build_models(cache, r)
    rows: list[dict] = []

    def score(label: str, how: str, folder: Path) -> None:
        s = evaluate_folder(folder, r.n_test)
        rows.append({"model": label, "how": how, **s})
        print(f"{label:28s} {how:30s} " + "  ".join(f"{k} {v:.3f}" for k, v in s.items()), flush=True)

    score("base", "ternary export", paths["base-bitnet"])
    for skill in SKILLS:
        score(f"expert {skill}", "ternary export (pick one)", paths[f"{skill}-bitnet"])
    for kind, suffix, how in [
        ("latent", "", "merge latent, then ternarise"),
        ("ternary", "-bitnet", "merge ternary, re-ternarise"),
    ]:
        base = str(paths[f"base{suffix}"])
        experts = [str(paths[f"{s}{suffix}"]) for s in SKILLS]
        for method, cfg in merge_configs(base, experts).items():
            out = cache / merge_folder(kind, method)
            if not out.exists():
                mergesmith.merge(cfg, out, quiet=True, out_format="bitnet")
            score(method, how, out)
    return rows


def packed_codes(folder: Path) -> dict[str, torch.Tensor]:
    """The ternary codes of every packed weight of a BitNet checkpoint."""
    from safetensors.torch import load_file

    from mergesmith.core.bitnet.pack import unpack_ternary

    tensors = load_file(folder / "model.safetensors")
    return {k: unpack_ternary(v) for k, v in tensors.items() if v.dtype == torch.uint8}


def code_stats(cache: Path, methods: list[str]) -> list[dict]:
    """Per merge: the fraction of codes that differ from the base's, and the share of each expert's
    own code changes that the merged model has too (latent vs ternary merge)."""
    base = packed_codes(cache / "base-bitnet")
    experts = {s: packed_codes(cache / f"{s}-bitnet") for s in SKILLS}
    total = sum(c.numel() for c in base.values())

    def changed(codes: dict[str, torch.Tensor]) -> float:
        return sum(int((codes[k] != base[k]).sum()) for k in base) / total

    def kept(codes: dict[str, torch.Tensor], expert: dict[str, torch.Tensor]) -> float:
        flips = {k: expert[k] != base[k] for k in base}
        same = sum(int((codes[k][flips[k]] == expert[k][flips[k]]).sum()) for k in base)
        return same / max(sum(int(f.sum()) for f in flips.values()), 1)

    rows = [
        {"model": f"expert {s}", "changed": changed(c), **{t: kept(c, e) for t, e in experts.items()}}
        for s, c in experts.items()
    ]
    for method in methods:
        for kind in ("latent", "ternary"):
            codes = packed_codes(cache / merge_folder(kind, method))
            rows.append(
                {
                    "model": f"{method}, {kind}",
                    "changed": changed(codes),
                    **{s: kept(codes, e) for s, e in experts.items()},
                }
            )
    return rows


def merge_folder(kind: str, method: str) -> str:
    return f"merge-{kind}-{method.replace(' ', '-').replace('(', '').replace(')', '')}"


def markdown(rows: list[dict]) -> str:
    keys = [*SKILLS, "generic"]
    lines = [
        "| model | how | " + " | ".join(keys) + " | mean of skills |",
        "| --- | --- | " + " | ".join("---" for _ in keys) + " | --- |",
    ]
    for row in rows:
        mean = sum(row[k] for k in SKILLS) / len(SKILLS)
        cells = " | ".join(f"{row[k]:.3f}" for k in keys)
        lines.append(f"| {row['model']} | {row['how']} | {cells} | {mean:.3f} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cache", type=Path, default=ROOT / ".bench-cache" / "bitnet_merge")
    p.add_argument("--fresh", action="store_true", help="delete the cache and train everything again")
    args = p.parse_args()
    torch.set_num_threads(1)
    torch._dynamo.config.disable = True  # transformers' BitNet kernels run eagerly (no 20 s compile)
    r = Recipe()
    if args.fresh and args.cache.exists():
        shutil.rmtree(args.cache)
    args.cache.mkdir(parents=True, exist_ok=True)
    (args.cache / "recipe.json").write_text(json.dumps(asdict(r), indent=2))
    start = time.perf_counter()
    rows = run(args.cache, r)
    stats = code_stats(args.cache, list(merge_configs("", [])))
    (args.cache / "results.json").write_text(json.dumps({"accuracy": rows, "codes": stats}, indent=2))
    print(markdown(rows))
    print()
    print(
        "| model | codes that differ from the base's | "
        + " | ".join(f"{s} flips kept" for s in SKILLS)
        + " |"
    )
    print("| --- | --- | " + " | ".join("---" for _ in SKILLS) + " |")
    for row in stats:
        kept = " | ".join(f"{row.get(s, 0.0):.3f}" for s in SKILLS)
        print(f"| {row['model']} | {row['changed']:.4f} | {kept} |")
    print(f"# {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
