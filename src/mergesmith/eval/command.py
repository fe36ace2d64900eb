"""``mergesmith eval``: score models on tasks files (exact match) and text files (perplexity).

Inputs are all checked before the first model loads, so a typo in the last ``--tasks`` costs nothing.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mergesmith.core.cliargs import add_verbosity
from mergesmith.core.errors import MergeError

if TYPE_CHECKING:  # the modules below import transformers: only when the command runs
    from mergesmith.eval.ppl import TextSet
    from mergesmith.eval.tasks import TaskScore, TaskSet

HELP = "score models: exact-match accuracy on tasks files, perplexity on text files"
DESCRIPTION = """\
Score one or more causal LMs on the CPU: folders written by save_pretrained or by mergesmith (BitNet
outputs included), org/name from the Hugging Face cache, or MODEL+ADAPTER (a PEFT LoRA adapter applied).

--tasks FILE.jsonl  lines of {"prompt": ..., "answer": ...}; the score is the share of prompts whose
                    greedy continuation (up to end-of-sequence or newline, whitespace stripped)
                    equals the answer exactly.
--ppl FILE.txt      perplexity; each non-empty line is scored as its own sequence.

Results print as a table (one row per model), or as JSON with --json.
"""


@dataclass
class ModelResult:
    """Everything measured for one model, in the order the inputs were given."""

    model: str
    tasks: list[TaskScore] = field(default_factory=list)
    ppl: dict[str, float] = field(default_factory=dict)


def register(subparsers: Any) -> None:
    """Add the ``eval`` sub-command to the mergesmith CLI."""
    parser = subparsers.add_parser(
        "eval", help=HELP, description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "models", nargs="+", metavar="MODEL", help="model(s) to score: folders, org/name, or MODEL+ADAPTER"
    )
    parser.add_argument(
        "--tasks", action="append", default=[], metavar="FILE.jsonl", help="tasks file (repeatable)"
    )
    parser.add_argument(
        "--ppl", action="append", default=[], metavar="FILE.txt", help="text file (repeatable)"
    )
    parser.add_argument(
        "--max-new-tokens",
        type=int,
        default=None,
        metavar="N",
        help="tokens to generate per prompt (default: longest answer's length + 2)",
    )
    parser.add_argument(
        "--batch-size", type=int, default=64, metavar="N", help="prompts per batch (default: 64)"
    )
    parser.add_argument(
        "--limit", type=int, default=None, metavar="N", help="score only the first N lines of each tasks file"
    )
    parser.add_argument("--json", action="store_true", help="print results as JSON instead of a table")
    add_verbosity(parser, "no progress bar on stderr")
    parser.set_defaults(func=run)


def _check_positive(name: str, value: int | None) -> None:
    if value is not None and value < 1:
        raise MergeError(f"{name} must be at least 1, got {value}")


def _limited(task: TaskSet, limit: int | None) -> TaskSet:
    if limit is None:
        return task
    return type(task)(task.name, task.path, task.prompts[:limit], task.answers[:limit])


def evaluate_models(
    models: Sequence[str],
    tasks: Sequence[TaskSet],
    texts: Sequence[TextSet],
    *,
    max_new_tokens: int | None,
    batch_size: int,
    quiet: bool,
) -> list[ModelResult]:
    """Load each model in turn (one in memory at a time) and score it on every input."""
    from tqdm import tqdm

    from mergesmith.eval.loading import load_model
    from mergesmith.eval.ppl import count_windows, score_text
    from mergesmith.eval.tasks import score_task

    results = []
    total_prompts = sum(len(t) for t in tasks) * len(models)
    with tqdm(total=total_prompts or None, disable=quiet, file=sys.stderr, unit="prompt", leave=False) as bar:
        for name in models:
            bar.set_description(Path(name).name or name)
            model, tokenizer = load_model(name)
            result = ModelResult(model=name)
            for task in tasks:
                result.tasks.append(
                    score_task(model, tokenizer, task, max_new_tokens, batch_size, on_batch=bar.update)
                )
            for text in texts:
                windows = count_windows(tokenizer, model, text)
                with tqdm(total=windows, disable=quiet, file=sys.stderr, unit="row", leave=False) as sub:
                    sub.set_description(f"ppl {text.name}")
                    result.ppl[text.name] = score_text(model, tokenizer, text, on_batch=sub.update).value
            results.append(result)
            del model
    return results


def to_json(results: Sequence[ModelResult]) -> dict[str, Any]:
    """A stable, machine-readable shape: models in order, each with per-task counts and perplexities."""
    return {
        "models": [
            {
                "model": r.model,
                "tasks": {
                    s.task: {"accuracy": s.accuracy, "correct": s.correct, "total": s.total} for s in r.tasks
                },
                "ppl": dict(r.ppl),
            }
            for r in results
        ]
    }


def format_table(results: Sequence[ModelResult]) -> str:
    """Models as rows; accuracies in percent, then perplexities, as aligned plain-text columns."""
    headers = ["model"]
    if results:
        headers += [s.task for s in results[0].tasks] + [f"ppl:{name}" for name in results[0].ppl]
    rows = [
        [r.model] + [f"{100 * s.accuracy:.1f}" for s in r.tasks] + [f"{v:.3f}" for v in r.ppl.values()]
        for r in results
    ]
    widths = [max(len(row[i]) for row in [headers, *rows]) for i in range(len(headers))]

    def line(cells: Sequence[str]) -> str:
        first = cells[0].ljust(widths[0])
        rest = [c.rjust(w) for c, w in zip(cells[1:], widths[1:], strict=True)]
        return "  ".join([first, *rest]).rstrip()

    ruler = "  ".join("-" * w for w in widths)
    return "\n".join([line(headers), ruler, *(line(r) for r in rows)])


def run(args: argparse.Namespace) -> int:
    """Check every input, score every model, print the results; MergeError becomes exit code 2."""
    _check_positive("--batch-size", args.batch_size)
    _check_positive("--max-new-tokens", args.max_new_tokens)
    _check_positive("--limit", args.limit)
    if not args.tasks and not args.ppl:
        raise MergeError("nothing to evaluate; give --tasks FILE.jsonl and/or --ppl FILE.txt")
    from mergesmith.eval.loading import check_model
    from mergesmith.eval.ppl import TextSet, load_text
    from mergesmith.eval.tasks import load_tasks, unique_names

    tasks = unique_names([_limited(load_tasks(p), args.limit) for p in args.tasks])
    texts = [load_text(p) for p in args.ppl]
    if len({t.name for t in texts}) < len(texts):
        texts = [TextSet(str(t.path), t.path, t.lines) for t in texts]
    for name in args.models:
        check_model(name)
    results = evaluate_models(
        args.models,
        tasks,
        texts,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        quiet=args.quiet,
    )
    if args.json:
        print(json.dumps(to_json(results), indent=2))
    else:
        print(format_table(results))
    return 0
