"""Train the small models that show mergesmith's merges work: one base and one expert per skill.

Without a model hub the project makes its own models. This script builds a character-level tokenizer,
pre-trains one small Llama on a generic mix (tagged tasks such as ``copy: ab1=`` -> ``ab1``, and the
skills described in words, such as ``reverse of abc=`` -> ``cba``), then fine-tunes a copy of it on each
skill asked with a terse tag (``rev: abc=``, ``sort: dcb=``, ``count a: abca=``, ``shift: abc=``), which
the base never saw. All experts share one base and one prompt format, as fine-tunes of one foundation
model do.

The fine-tunes are gentle (plain SGD, a few hundred steps, replay of the pre-training mix) and change
only the feed-forward (MLP) blocks, so each task vector stays small relative to the base, which gives task
arithmetic and TIES a chance, and lives where a mixture of experts puts its experts.
See docs/skills.md for the figures and for what did not work.

Everything is seeded and runs on the CPU with a fixed number of threads, so running it again with the
same torch version on the same kind of CPU rebuilds the shipped weights bit for bit.

    PYTHONPATH=src python examples/skills/train.py            # writes examples/skills/{data,models}
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import random
import shutil
import string
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

HERE = Path(__file__).resolve().parent
SPECIAL_TOKENS = ["<pad>", "<bos>", "<eos>", "<unk>"]
ALPHABET = string.ascii_lowercase + string.digits + " :=+,-"
LETTERS = string.ascii_lowercase

Pair = tuple[str, str]


@dataclass(frozen=True)
class Recipe:
    """Every number that decides the shipped weights; written next to the models as ``recipe.json``."""

    seed: int = 1234
    threads: int = 1
    hidden_size: int = 128
    intermediate_size: int = 1024
    num_layers: int = 3
    num_heads: int = 4
    max_positions: int = 64
    batch_size: int = 64
    pretrain_steps: int = 3000
    pretrain_lr: float = 2e-3
    finetune_steps: int = 400
    finetune_lr: float = 0.1
    finetune_momentum: float = 0.9
    finetune_only: str = "mlp"
    finetune_anchor: float = 1e-3
    save_dtype: str = "float16"
    replay: int = 16
    warmup_steps: int = 50
    n_train: int = 4000
    n_val: int = 200
    n_test: int = 500


# ---------------------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------------------


def build_tokenizer() -> PreTrainedTokenizerFast:
    """A one-token-per-character tokenizer that ``AutoTokenizer.from_pretrained`` loads back.

    Characters keep the vocabulary tiny (46 ids) and make every skill's input visible to the model one
    symbol at a time, so a small model can learn the skills. Left padding is the default because batched
    greedy generation needs the prompts to end at the same position.
    """
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + list(ALPHABET))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", vocab["<bos>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        padding_side="left",
        model_max_length=Recipe.max_positions,
    )


# ---------------------------------------------------------------------------------------------------------
# Tasks
# ---------------------------------------------------------------------------------------------------------

Operands = tuple[str, ...]


def _letters(rng: random.Random, lo: int, hi: int, pool: str = LETTERS) -> str:
    return "".join(rng.choice(pool) for _ in range(rng.randint(lo, hi)))


def _generic_input(rng: random.Random) -> str:
    return _letters(rng, 1, 10, string.ascii_lowercase + string.digits + "+,")


#: The tagged tasks of pre-training. They teach the prompt format and that the tag picks the operation,
#: so the base has no single default (such as copying) that every fine-tune would have to fight.
GENERIC_TASKS: dict[str, Callable[[str], str]] = {
    "copy": lambda x: x,
    "len": lambda x: str(len(x)),
    "first": lambda x: x[0],
    "last": lambda x: x[-1],
    "tail": lambda x: x[1:] or x,
    "init": lambda x: x[:-1] or x,
}


def generic_example(name: str, rng: random.Random) -> Pair:
    text = _generic_input(rng)
    return f"{name}: {text}=", GENERIC_TASKS[name](text)


def draw_word(rng: random.Random, lo: int, hi: int, redraw: Callable[[str], bool]) -> Operands:
    """A random word; words for which copying would be right (palindromes, sorted words) are redrawn."""
    text = _letters(rng, lo, hi)
    while redraw(text):
        text = _letters(rng, lo, hi)
    return (text,)


def draw_count(rng: random.Random) -> Operands:
    """A letter and a word over a five-letter alphabet, so counts above one are common."""
    return rng.choice("abcde"), _letters(rng, 3, 7, "abcde")


def shift_letters(word: str) -> str:
    """Each letter replaced by the next one in the alphabet, ``z`` by ``a``."""
    return "".join(LETTERS[(LETTERS.index(c) + 1) % 26] for c in word)


@dataclass(frozen=True)
class Skill:
    """One skill: its operands, the tagged prompt an expert learns, and the base's running-text form.

    The base reads every operation described in words (``letters in order dcb=bcd``) during
    pre-training, as a real base model has seen arithmetic and word games in its corpus; an expert
    learns to do one of them when asked with a terse tag (``sort: dcb=``), which the base never saw.
    Both forms end the same way (input, ``=``, answer), so the expert can reuse the base's circuits.
    """

    draw: Callable[[random.Random], Operands]
    prompt: str
    text: str
    solve: Callable[..., str]

    def example(self, ops: Operands) -> Pair:
        return self.prompt.format(*ops), self.solve(*ops)

    def text_example(self, ops: Operands) -> Pair:
        return self.text.format(*ops), self.solve(*ops)


SKILLS: dict[str, Skill] = {
    "rev": Skill(
        lambda rng: draw_word(rng, 3, 7, lambda w: w == w[::-1]),
        "rev: {0}=",
        "reverse of {0}=",
        lambda w: w[::-1],
    ),
    "sort": Skill(
        lambda rng: draw_word(rng, 3, 6, lambda w: w == "".join(sorted(w))),
        "sort: {0}=",
        "letters in order {0}=",
        lambda w: "".join(sorted(w)),
    ),
    "count": Skill(draw_count, "count {0}: {1}=", "number of {0} in {1}=", lambda c, w: str(w.count(c))),
    "shift": Skill(
        lambda rng: draw_word(rng, 3, 7, lambda w: False),
        "shift: {0}=",
        "next letters of {0}=",
        shift_letters,
    ),
}

#: Shares of the pre-training mix: the tagged generic tasks, then each skill in running text.
PRETRAIN_WEIGHTS = {
    "copy": 0.5,
    "len": 0.5,
    "first": 0.5,
    "last": 0.5,
    "tail": 0.5,
    "init": 0.5,
    "rev": 1.0,
    "sort": 1.5,
    "count": 2.0,
    "shift": 1.0,
}


def make_splits(skill: str, recipe: Recipe) -> dict[str, list[Operands]]:
    """Draw distinct operands and cut them into train/val/test, so the held-out splits never leak."""
    rng = random.Random(f"{recipe.seed}-data-{skill}")
    wanted = recipe.n_train + recipe.n_val + recipe.n_test
    seen: dict[Operands, None] = {}
    for _ in range(wanted * 50):
        seen.setdefault(SKILLS[skill].draw(rng))
        if len(seen) == wanted:
            break
    ops = list(seen)
    if len(ops) < wanted:
        raise RuntimeError(f"{skill}: only {len(ops)} distinct prompts, wanted {wanted}")
    test = ops[: recipe.n_test]
    val = ops[recipe.n_test : recipe.n_test + recipe.n_val]
    train = ops[recipe.n_test + recipe.n_val :]
    return {"train": train, "val": val, "test": test}


def pretrain_example(rng: random.Random, held_out: dict[str, set[Operands]]) -> Pair:
    """One example of the generic mix: a tagged generic task, or a skill in running text.

    Operands of every skill's val and test splits never appear, so the experts' test scores measure
    generalisation, not recall from pre-training.
    """
    names = list(PRETRAIN_WEIGHTS)
    name = rng.choices(names, weights=[PRETRAIN_WEIGHTS[n] for n in names])[0]
    if name in GENERIC_TASKS:
        return generic_example(name, rng)
    skill = SKILLS[name]
    ops = skill.draw(rng)
    while ops in held_out.get(name, set()):
        ops = skill.draw(rng)
    return skill.text_example(ops)


def write_jsonl(path: Path, pairs: Sequence[Pair]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as fh:
        for prompt, answer in pairs:
            fh.write(json.dumps({"prompt": prompt, "answer": answer}) + "\n")


# ---------------------------------------------------------------------------------------------------------
# Model and training
# ---------------------------------------------------------------------------------------------------------


def build_model(recipe: Recipe, tokenizer: PreTrainedTokenizerFast) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=recipe.hidden_size,
        intermediate_size=recipe.intermediate_size,
        num_hidden_layers=recipe.num_layers,
        num_attention_heads=recipe.num_heads,
        num_key_value_heads=recipe.num_heads,
        max_position_embeddings=recipe.max_positions,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(recipe.seed)
    return LlamaForCausalLM(config).float()


def encode_batch(tokenizer: PreTrainedTokenizerFast, pairs: Sequence[Pair]) -> dict[str, torch.Tensor]:
    """Right-padded ``<bos> prompt answer <eos>`` rows with the loss on the answer and ``<eos>`` only."""
    rows, labels = [], []
    for prompt, answer in pairs:
        p = tokenizer.encode(prompt)
        a = tokenizer.encode(answer, add_special_tokens=False) + [tokenizer.eos_token_id]
        rows.append(p + a)
        labels.append([-100] * len(p) + a)
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id
    ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
    lab = torch.tensor([r + [-100] * (width - len(r)) for r in labels])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    return {"input_ids": ids, "attention_mask": mask, "labels": lab}


def _lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warm-up then cosine decay to a tenth: the usual schedule, stable for tiny models."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def train(
    model: LlamaForCausalLM,
    batches: Iterator[dict[str, torch.Tensor]],
    steps: int,
    opt: torch.optim.Optimizer,
    recipe: Recipe,
    label: str,
    anchor: float = 0.0,
) -> None:
    """Train in place with warm-up and cosine decay from each parameter group's initial learning rate.

    With ``anchor`` > 0 the loss gets ``anchor * ||theta - theta_start||^2`` over the trained parameters
    (L2-SP): a pull back to where fine-tuning started, which keeps the task vector to what the task needs.
    """
    trained = [p for p in model.parameters() if p.requires_grad]
    start_values = [p.detach().clone() for p in trained] if anchor else []
    peak = opt.param_groups[0]["lr"]
    model.train()
    start = time.perf_counter()
    running = 0.0
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, steps, peak, recipe.warmup_steps)
        loss = model(**next(batches)).loss
        if anchor:
            loss = loss + anchor * sum(((p - p0) ** 2).sum() for p, p0 in zip(trained, start_values))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        running = 0.98 * running + 0.02 * loss.item() if step else loss.item()
        if (step + 1) % max(1, steps // 8) == 0 or step + 1 == steps:
            print(
                f"  {label} step {step + 1}/{steps} loss {running:.4f} ({time.perf_counter() - start:.0f}s)"
            )
    model.eval()


def pretrain_batches(
    held_out: dict[str, set[Operands]], tokenizer: PreTrainedTokenizerFast, recipe: Recipe
) -> Iterator[dict[str, torch.Tensor]]:
    """An endless, seeded stream of batches of the generic pre-training mix."""
    rng = random.Random(f"{recipe.seed}-pretrain")
    while True:
        yield encode_batch(tokenizer, [pretrain_example(rng, held_out) for _ in range(recipe.batch_size)])


def finetune_batches(
    skill: str,
    train_ops: Sequence[Operands],
    held_out: dict[str, set[Operands]],
    tokenizer: PreTrainedTokenizerFast,
    recipe: Recipe,
) -> Iterator[dict[str, torch.Tensor]]:
    """Tagged examples of one skill plus a replay share of the pre-training mix.

    The replay keeps the expert's behaviour outside its own tag as it was, so the fine-tune changes the
    model only where its skill is asked for: the task vectors then interfere less when merged.
    """
    rng = random.Random(f"{recipe.seed}-finetune-{skill}")
    n_skill = recipe.batch_size - recipe.replay
    while True:
        batch = [SKILLS[skill].example(ops) for ops in rng.sample(list(train_ops), n_skill)]
        batch += [pretrain_example(rng, held_out) for _ in range(recipe.replay)]
        yield encode_batch(tokenizer, batch)


@torch.no_grad()
def greedy_accuracy(
    model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, pairs: Sequence[Pair], batch: int = 250
) -> float:
    """Exact-match accuracy of greedy answers; a quick check while training (mergesmith eval is the tool)."""
    correct = 0
    for i in range(0, len(pairs), batch):
        chunk = pairs[i : i + batch]
        enc = tokenizer([p for p, _ in chunk], return_tensors="pt", padding=True)
        out = model.generate(**enc, max_new_tokens=10, do_sample=False)
        texts = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
        correct += sum(t.strip() == a for t, (_, a) in zip(texts, chunk, strict=True))
    return correct / len(pairs)


def save(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, folder: Path, recipe: Recipe) -> None:
    if folder.exists():
        shutil.rmtree(folder)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        do_sample=False,
        max_new_tokens=8,
    )
    # float16 halves the files and keeps 11 significant bits: a task vector of ~10% of a weight keeps
    # ~8 bits. Experts are fine-tuned from the saved (rounded) base, so their task vectors are exact
    # differences of the shipped files, and --reuse-base rebuilds the same experts as a full run.
    copy.deepcopy(model).to(getattr(torch, recipe.save_dtype)).save_pretrained(
        folder, safe_serialization=True
    )
    tokenizer.save_pretrained(folder)
    (folder / "recipe.json").write_text(json.dumps(asdict(recipe), indent=2) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--out", type=Path, default=HERE / "models", help="models folder (default: %(default)s)"
    )
    parser.add_argument("--data", type=Path, default=HERE / "data", help="data folder (default: %(default)s)")
    parser.add_argument(
        "--skills", nargs="+", default=list(SKILLS), choices=list(SKILLS), help="experts to train"
    )
    parser.add_argument("--reuse-base", action="store_true", help="fine-tune the base already in --out")
    parser.add_argument("--finetune-lr", type=float, help="override the recipe's fine-tuning learning rate")
    parser.add_argument("--finetune-steps", type=int, help="override the recipe's fine-tuning steps")
    parser.add_argument("--finetune-anchor", type=float, help="override the recipe's L2-SP strength")
    parser.add_argument("--intermediate-size", type=int, help="override the recipe's MLP width")
    parser.add_argument(
        "--finetune-only", help="train only parameters whose name contains this ('' trains all)"
    )
    args = parser.parse_args(argv)

    overrides = {
        "finetune_lr": args.finetune_lr,
        "finetune_steps": args.finetune_steps,
        "finetune_only": args.finetune_only,
        "finetune_anchor": args.finetune_anchor,
        "intermediate_size": args.intermediate_size,
    }
    recipe = Recipe(**{k: v for k, v in overrides.items() if v is not None})
    torch.set_num_threads(recipe.threads)
    torch.use_deterministic_algorithms(True)
    tokenizer = build_tokenizer()
    t0 = time.perf_counter()

    splits = {skill: make_splits(skill, recipe) for skill in SKILLS}
    held_out = {skill: set(sp["val"]) | set(sp["test"]) for skill, sp in splits.items()}
    for skill in args.skills:
        for split, ops in splits[skill].items():
            write_jsonl(args.data / skill / f"{split}.jsonl", [SKILLS[skill].example(o) for o in ops])

    if args.reuse_base:
        base = LlamaForCausalLM.from_pretrained(args.out / "base", dtype=torch.float32)
    else:
        base = build_model(recipe, tokenizer)
        print(f"base: {sum(p.numel() for p in base.parameters()):,} parameters")
        opt = torch.optim.AdamW(base.parameters(), lr=recipe.pretrain_lr, weight_decay=0.0, betas=(0.9, 0.98))
        train(base, pretrain_batches(held_out, tokenizer, recipe), recipe.pretrain_steps, opt, recipe, "base")
        save(base, tokenizer, args.out / "base", recipe)
    for skill in args.skills:
        val = splits[skill]["val"]
        tagged = greedy_accuracy(base, tokenizer, [SKILLS[skill].example(o) for o in val])
        text = greedy_accuracy(base, tokenizer, [SKILLS[skill].text_example(o) for o in val])
        print(f"base on {skill}: tagged val {tagged:.3f}, running-text val {text:.3f}")

    for skill in args.skills:
        expert = LlamaForCausalLM.from_pretrained(args.out / "base", dtype=torch.float32)
        batches = finetune_batches(skill, splits[skill]["train"], held_out, tokenizer, recipe)
        # Plain SGD, not Adam: Adam moves every weight by about the learning rate each step, even
        # weights whose gradient is noise, and that noise is what makes task vectors collide in a merge.
        # Only the MLP blocks learn (recipe.finetune_only): attention, norms and embeddings stay the
        # base's, so an MoE of the experts (base attention, expert MLPs) can compute what each expert does.
        trained = [p for n, p in expert.named_parameters() if recipe.finetune_only in n]
        for p in expert.parameters():
            p.requires_grad_(False)
        for p in trained:
            p.requires_grad_(True)
        opt = torch.optim.SGD(trained, lr=recipe.finetune_lr, momentum=recipe.finetune_momentum)
        train(expert, batches, recipe.finetune_steps, opt, recipe, skill, anchor=recipe.finetune_anchor)
        save(expert, tokenizer, args.out / skill, recipe)
        acc = greedy_accuracy(expert, tokenizer, [SKILLS[skill].example(o) for o in splits[skill]["val"]])
        print(f"{skill}: tagged val {acc:.3f}")
    print(f"done in {time.perf_counter() - t0:.0f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
