"""Evaluation: does a merged model still do what its parents did?

``evaluate_tasks`` scores exact-match accuracy of greedy answers on ``{"prompt", "answer"}`` JSON lines;
``perplexity`` scores plain text. ``mergesmith eval`` is the command-line face of both.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mergesmith.eval.ppl import perplexity
    from mergesmith.eval.tasks import TaskScore, TaskSet, evaluate_tasks, load_tasks

# Imported on first use: these modules load transformers (seconds), which `mergesmith merge` never needs.
_EXPORTS = {
    "TaskScore": "mergesmith.eval.tasks",
    "TaskSet": "mergesmith.eval.tasks",
    "evaluate_tasks": "mergesmith.eval.tasks",
    "load_tasks": "mergesmith.eval.tasks",
    "perplexity": "mergesmith.eval.ppl",
}

__all__ = ["TaskScore", "TaskSet", "evaluate_tasks", "load_tasks", "perplexity"]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
