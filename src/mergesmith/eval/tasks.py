"""Exact-match accuracy of greedy generations on ``{"prompt": ..., "answer": ...}`` JSON lines.

A merge is only as good as what the merged model answers, so this scores whole answers: the model's
greedy continuation of each prompt, cut at its end-of-sequence token (or a newline) and stripped of
surrounding whitespace, must equal the expected answer exactly.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mergesmith.core.errors import MergeError
from mergesmith.eval.loading import ModelLike, load_model

#: Names of split files that say little on their own: ``add/test.jsonl`` is called ``add/test``.
SPLIT_NAMES = {"train", "val", "valid", "validation", "dev", "test", "eval"}


@dataclass(frozen=True)
class TaskSet:
    """The prompts and answers of one tasks file, checked line by line."""

    name: str
    path: Path
    prompts: tuple[str, ...]
    answers: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.prompts)


@dataclass(frozen=True)
class TaskScore:
    """How many answers of one task a model got exactly right."""

    task: str
    correct: int
    total: int

    @property
    def accuracy(self) -> float:
        return self.correct / self.total if self.total else 0.0


def task_name(path: Path) -> str:
    """A short column name: the file's stem, with its folder when the stem is only a split name."""
    if path.stem.lower() in SPLIT_NAMES and path.parent.name not in {"", "."}:
        return f"{path.parent.name}/{path.stem}"
    return path.stem


def _parse_line(path: Path, lineno: int, line: str) -> tuple[str, str]:
    hint = 'each line must be a JSON object like {"prompt": "...", "answer": "..."}'
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise MergeError(f"{path}:{lineno}: not JSON ({exc.msg}); {hint}") from None
    if not isinstance(record, dict):
        raise MergeError(f"{path}:{lineno}: a JSON {type(record).__name__}, not an object; {hint}")
    missing = [key for key in ("prompt", "answer") if key not in record]
    if missing:
        raise MergeError(f"{path}:{lineno}: no {' or '.join(repr(k) for k in missing)} field; {hint}")
    prompt, answer = record["prompt"], record["answer"]
    if not isinstance(prompt, str) or not isinstance(answer, str):
        raise MergeError(f"{path}:{lineno}: 'prompt' and 'answer' must be strings; {hint}")
    return prompt, answer


def load_tasks(path: str | Path, name: str | None = None) -> TaskSet:
    """Read and check a tasks file; blank lines are skipped, anything else malformed is an error."""
    path = Path(path)
    if not path.is_file():
        how = "is a folder" if path.is_dir() else "does not exist"
        raise MergeError(f"tasks file {path} {how}; pass a .jsonl file of prompt/answer lines")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise MergeError(
            f"tasks file {path} is not UTF-8 text (byte {exc.start}); save it as UTF-8"
        ) from None
    pairs = [_parse_line(path, n, line) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    if not pairs:
        raise MergeError(f'tasks file {path} is empty; add lines like {{"prompt": "...", "answer": "..."}}')
    return TaskSet(
        name=name or task_name(path),
        path=path,
        prompts=tuple(p for p, _ in pairs),
        answers=tuple(a for _, a in pairs),
    )


def unique_names(tasks: Sequence[TaskSet]) -> list[TaskSet]:
    """Give tasks that would share a column name their full path as name, so no score hides another."""
    counts: dict[str, int] = {}
    for task in tasks:
        counts[task.name] = counts.get(task.name, 0) + 1
    return [TaskSet(str(t.path), t.path, t.prompts, t.answers) if counts[t.name] > 1 else t for t in tasks]


def default_max_new_tokens(tokenizer: Any, answers: Iterable[str]) -> int:
    """Enough new tokens for the longest answer, plus slack for the end token and merged tokens."""
    longest = max(len(tokenizer.encode(a, add_special_tokens=False)) for a in answers)
    return longest + 2


def clean_prediction(text: str) -> str:
    """The answer part of a continuation: up to the first newline, without surrounding spaces."""
    return text.split("\n", 1)[0].strip()


@torch.no_grad()
def generate_answers(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    max_new_tokens: int,
    batch_size: int = 64,
    on_batch: Callable[[int], None] | None = None,
) -> list[str]:
    """Greedy continuations of ``prompts``, batched with left padding; sorted by length to pad less."""
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out: list[str] = [""] * len(prompts)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        enc = tokenizer([prompts[i] for i in idx], return_tensors="pt", padding=True)
        generated = model.generate(
            **enc,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            num_beams=1,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        texts = tokenizer.batch_decode(generated[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
        for i, text in zip(idx, texts, strict=True):
            out[i] = clean_prediction(text)
        if on_batch is not None:
            on_batch(len(idx))
    return out


def score_task(
    model: Any,
    tokenizer: Any,
    task: TaskSet,
    max_new_tokens: int | None = None,
    batch_size: int = 64,
    on_batch: Callable[[int], None] | None = None,
) -> TaskScore:
    """Exact-match score of one loaded model on one task (a small model on one torch thread)."""
    from mergesmith.core.threads import threads_for

    budget = max_new_tokens or default_max_new_tokens(tokenizer, task.answers)
    with threads_for(model):
        predictions = generate_answers(model, tokenizer, task.prompts, budget, batch_size, on_batch)
    correct = sum(p == a.strip() for p, a in zip(predictions, task.answers, strict=True))
    return TaskScore(task.name, correct, len(task))


@torch.no_grad()
def _answer_logprobs(model: Any, rows: Sequence[tuple[list[int], list[int]]], pad_id: int) -> torch.Tensor:
    """log p(answer | prompt) of each (prompt ids, answer ids) row, teacher-forced, right-padded."""
    full = [p + a for p, a in rows]
    width = max(len(r) for r in full)
    ids = torch.tensor([r + [pad_id] * (width - len(r)) for r in full])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in full])
    logp = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits[:, :-1].float(), dim=-1)
    picked = logp.gather(-1, ids[:, 1:, None])[..., 0]  # [B, width - 1]: log p(token t+1 | up to t)
    scored = torch.zeros_like(picked, dtype=torch.bool)
    for b, (p, a) in enumerate(rows):
        scored[b, len(p) - 1 : len(p) - 1 + len(a)] = True
    return (picked * scored).sum(-1)


def answer_rows(tokenizer: Any, task: TaskSet) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, answer ids + end token) of every line of ``task``, for ``score_answer_prob``; an
    answer that exact match could never score (one the tokenizer cannot spell, or with a newline, where
    a prediction is cut), or a line that encodes to nothing, is an error naming its line."""
    end = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    unk = tokenizer.unk_token_id
    rows = []
    for line, (p, a) in enumerate(zip(task.prompts, task.answers, strict=True), start=1):
        prompt = list(tokenizer(p)["input_ids"])
        answer = list(tokenizer.encode(a.strip(), add_special_tokens=False)) + end
        where = f"tasks file {task.path}, line {line}"
        if not prompt or not answer:
            raise MergeError(
                f"{where}: the prompt or the answer encodes to no tokens; answer_prob needs both"
            )
        if "\n" in a.strip() or (unk is not None and unk in answer):
            raise MergeError(
                f"{where}: the answer {a!r} holds a newline or characters the tokenizer does not know, so "
                "no answer can match it; fix the tasks file"
            )
        rows.append((prompt, answer))
    return rows


def score_answer_prob(model: Any, tokenizer: Any, task: TaskSet, batch_size: int = 64) -> float:
    """The mean probability the model gives each whole reference answer, followed by its end token.

    Teacher-forced: one forward pass per batch, no generation. It is the expected exact-match accuracy
    of sampling at temperature 1 (a prompt counts p(answer) instead of 0 or 1), so it moves smoothly
    with the weights, where greedy exact match moves in steps of one prompt: ``metric: answer_prob`` in
    a search's tasks. The answer is tokenized on its own (as generation would produce it after the
    prompt); the end token is counted when the tokenizer has one, since exact match needs the answer to
    stop there.
    """
    from mergesmith.core.threads import threads_for

    rows = answer_rows(tokenizer, task)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    total = 0.0
    with threads_for(model):
        for start in range(0, len(rows), batch_size):
            total += float(_answer_logprobs(model, rows[start : start + batch_size], pad_id).exp().sum())
    return total / len(rows) if rows else 0.0


def evaluate_tasks(
    model_or_path: ModelLike,
    tasks: str | Path | TaskSet | Sequence[str | Path | TaskSet],
    *,
    tokenizer: Any = None,
    max_new_tokens: int | None = None,
    batch_size: int = 64,
) -> dict[str, float]:
    """Exact-match accuracy (0..1) of a model folder or in-memory model on each tasks file, by task name.

    This is the call the merge demo and the benchmarks use; ``mergesmith eval`` adds a table around it.
    """
    items = [tasks] if isinstance(tasks, (str, Path, TaskSet)) else list(tasks)
    sets = unique_names([t if isinstance(t, TaskSet) else load_tasks(t) for t in items])
    model, tok = load_model(model_or_path, tokenizer)
    return {
        t.name: score_task(model, tok, t, max_new_tokens=max_new_tokens, batch_size=batch_size).accuracy
        for t in sets
    }
