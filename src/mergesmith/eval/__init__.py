"""Evaluation: does a merged model still do what its parents did?

``evaluate_tasks`` scores exact-match accuracy of greedy answers on ``{"prompt", "answer"}`` JSON lines;
``perplexity`` scores plain text. ``mergesmith eval`` is the command-line face of both.
"""

from mergesmith.eval.ppl import perplexity
from mergesmith.eval.tasks import TaskScore, TaskSet, evaluate_tasks, load_tasks

__all__ = ["TaskScore", "TaskSet", "evaluate_tasks", "load_tasks", "perplexity"]
