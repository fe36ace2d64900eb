"""Perplexity on plain text: a quick check that a merge did not damage the model's language modelling.

Each non-empty line of the file is scored as its own sequence (with the tokenizer's special tokens, e.g.
a leading ``<bos>``), so the figure does not depend on how lines happen to be packed together. A line
longer than the model's context is cut into consecutive windows. Perplexity is
``exp(total negative log-likelihood / number of predicted tokens)`` over the whole file.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mergesmith.core.errors import MergeError
from mergesmith.eval.loading import ModelLike, load_model


@dataclass(frozen=True)
class TextSet:
    """The non-empty lines of one plain-text file."""

    name: str
    path: Path
    lines: tuple[str, ...]


@dataclass(frozen=True)
class Perplexity:
    """Summed negative log-likelihood and the number of tokens it covers."""

    text: str
    nll: float
    tokens: int

    @property
    def value(self) -> float:
        return math.exp(self.nll / self.tokens)


def load_text(path: str | Path, name: str | None = None) -> TextSet:
    """Read a UTF-8 text file; one with no non-empty line is an error, since nothing could be scored."""
    path = Path(path)
    if not path.is_file():
        how = "is a folder" if path.is_dir() else "does not exist"
        raise MergeError(f"text file {path} {how}; pass a plain UTF-8 .txt file for --ppl")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise MergeError(f"text file {path} is not UTF-8 text (byte {exc.start}); save it as UTF-8") from None
    lines = tuple(line for line in text.splitlines() if line.strip())
    if not lines:
        raise MergeError(f"text file {path} is empty; --ppl needs some lines of text")
    return TextSet(name=name or path.stem, path=path, lines=lines)


def context_length(model: Any, default: int = 1024) -> int:
    """The longest window the model can score, from its config (capped, to keep CPU memory sane)."""
    limit = getattr(model.config, "max_position_embeddings", None) or default
    return int(min(limit, default))


def _windows(ids: Sequence[int], width: int) -> list[list[int]]:
    """Consecutive windows of at most ``width`` tokens; each predicts all its tokens but the first."""
    return [list(ids[i : i + width]) for i in range(0, len(ids), width) if len(ids[i : i + width]) > 1]


@torch.no_grad()
def _score_rows(model: Any, rows: Sequence[list[int]], pad_id: int) -> float:
    """Summed NLL of right-padded rows; only real next-token predictions are counted."""
    width = max(len(r) for r in rows)
    ids = torch.tensor([r + [pad_id] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    logits = model(input_ids=ids, attention_mask=mask).logits.float()
    logp = torch.log_softmax(logits[:, :-1], dim=-1)
    target = ids[:, 1:]
    picked = logp.gather(-1, target.unsqueeze(-1)).squeeze(-1)
    return float(-(picked * mask[:, 1:]).sum())


def score_text(
    model: Any,
    tokenizer: Any,
    text: TextSet,
    batch_size: int = 16,
    on_batch: Callable[[int], None] | None = None,
) -> Perplexity:
    """Perplexity of one loaded model on one text set (a small model on one torch thread)."""
    from mergesmith.core.threads import threads_for

    width = context_length(model)
    rows = [w for line in text.lines for w in _windows(tokenizer(line)["input_ids"], width)]
    if not rows:
        raise MergeError(f"text file {text.path}: every line is a single token; nothing to predict")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    nll = 0.0
    with threads_for(model):
        for start in range(0, len(rows), batch_size):
            nll += _score_rows(model, rows[start : start + batch_size], pad_id)
            if on_batch is not None:
                on_batch(min(batch_size, len(rows) - start))
    return Perplexity(text.name, nll, sum(len(r) - 1 for r in rows))


def count_windows(tokenizer: Any, model: Any, text: TextSet) -> int:
    """How many rows ``score_text`` will score, for a progress bar's total."""
    width = context_length(model)
    return sum(len(_windows(tokenizer(line)["input_ids"], width)) for line in text.lines)


def perplexity(
    model_or_path: ModelLike, text_path: str | Path, *, tokenizer: Any = None, batch_size: int = 16
) -> float:
    """Perplexity of a model folder or in-memory model on a plain-text file (lower is better)."""
    text = load_text(text_path)
    model, tok = load_model(model_or_path, tokenizer)
    return score_text(model, tok, text, batch_size=batch_size).value
