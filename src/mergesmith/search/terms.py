"""Fitness terms: what a candidate is scored on (exact-match tasks files, perplexity, lm-eval tasks)."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Any

from mergesmith.core.errors import MergeError
from mergesmith.search.config import SearchConfig, Task


@dataclass(frozen=True)
class FitnessTerm:
    """One task of SEARCH.yml, with its data loaded (picklable: workers get it once)."""

    name: str
    kind: str  # tasks | answer_prob | ppl | lm_eval
    weight: float
    data: Any  # TaskSet, TextSet, or the lm-eval task's settings

    def score(self, model: Any, tokenizer: Any) -> float:
        if self.kind == "tasks":
            from mergesmith.eval.tasks import score_task

            return score_task(model, tokenizer, self.data).accuracy
        if self.kind == "answer_prob":
            from mergesmith.eval.tasks import score_answer_prob

            return score_answer_prob(model, tokenizer, self.data)
        if self.kind == "ppl":
            from mergesmith.eval.ppl import score_text

            return score_text(model, tokenizer, self.data).value
        return _lm_eval_score(model, tokenizer, self.data)


def lm_eval_missing() -> bool:
    return importlib.util.find_spec("lm_eval") is None


def build_terms(config: SearchConfig) -> list[FitnessTerm]:
    """Load every task's data (the first ``limit`` prompts or lines), checked."""
    return [build_term(t, t.limit or config.limit, config) for t in config.tasks]


def build_term(task: Task, limit: int | None, config: SearchConfig) -> FitnessTerm:
    from dataclasses import replace

    if task.kind in ("tasks", "answer_prob"):
        from mergesmith.eval.tasks import load_tasks

        data = load_tasks(task.tasks_file, task.name)
        if limit is not None:
            data = replace(data, prompts=data.prompts[:limit], answers=data.answers[:limit])
        return FitnessTerm(task.name, task.kind, task.weight, data)
    if task.kind == "ppl":
        from mergesmith.eval.ppl import load_text

        text = load_text(task.ppl_file, task.name)
        if limit is not None:
            text = replace(text, lines=text.lines[:limit])
        return FitnessTerm(task.name, "ppl", task.weight, text)
    if lm_eval_missing():
        raise MergeError(
            f"task {task.name!r} is an lm-eval task (no tasks_file or ppl_file), and lm-eval is not installed; "
            "pip install lm-eval, or score a tasks_file instead"
        )
    settings = {
        "task": task.name,
        "metric": task.metric or "acc,none",
        "limit": limit,
        "num_fewshot": config.num_fewshot,
        "apply_chat_template": config.apply_chat_template,
        "fewshot_as_multiturn": config.fewshot_as_multiturn,
    }
    return FitnessTerm(task.name, "lm_eval", task.weight, settings)


def held_out_terms(config: SearchConfig) -> list[FitnessTerm]:
    """The held-out tasks files, whole (no limit), each a term of weight 1."""
    from mergesmith.eval.tasks import load_tasks, unique_names

    sets = unique_names([load_tasks(f) for f in config.held_out])
    return [FitnessTerm(s.name, "tasks", 1.0, s) for s in sets]


def _lm_eval_score(model: Any, tokenizer: Any, settings: dict) -> float:  # pragma: no cover - optional
    """One lm-eval-harness task on the in-memory model (lm-eval's HFLM wrapper), its ``metric``."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    kwargs = {k: settings[k] for k in ("limit", "num_fewshot") if settings[k] is not None}
    results = simple_evaluate(
        model=HFLM(pretrained=model, tokenizer=tokenizer, batch_size=8),
        tasks=[settings["task"]],
        apply_chat_template=settings["apply_chat_template"],
        fewshot_as_multiturn=settings["fewshot_as_multiturn"],
        **kwargs,
    )
    try:
        return float(results["results"][settings["task"]][settings["metric"]])
    except KeyError:
        raise MergeError(
            f"lm-eval task {settings['task']!r} has no metric {settings['metric']!r}; set `metric:` to one it reports"
        ) from None
