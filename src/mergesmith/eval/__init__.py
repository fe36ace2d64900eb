"""Evaluation: does a merged model still do what its parents did?

``evaluate_tasks`` scores exact-match accuracy of greedy answers on ``{"prompt", "answer"}`` JSON lines;
``perplexity`` scores plain text. ``mergesmith eval`` is the command-line face of both. The names are
imported on first use: their modules load transformers (seconds), which ``mergesmith merge`` never needs.
"""

from mergesmith.core.lazy import lazy_exports

__all__ = ["TaskScore", "TaskSet", "evaluate_tasks", "load_tasks", "perplexity"]
__getattr__ = lazy_exports(
    __name__,
    {
        "TaskScore": "mergesmith.eval.tasks",
        "TaskSet": "mergesmith.eval.tasks",
        "evaluate_tasks": "mergesmith.eval.tasks",
        "load_tasks": "mergesmith.eval.tasks",
        "perplexity": "mergesmith.eval.ppl",
    },
)
