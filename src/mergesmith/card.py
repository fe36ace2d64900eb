"""The model card (README.md) written beside a merged model."""

from __future__ import annotations

import yaml

from mergesmith.plan import MergePlan


def model_card(plan: MergePlan, config_text: str) -> str:
    refs = list(plan.models)
    front = {
        "base_model": refs,
        "library_name": "transformers",
        "tags": ["merge", "mergesmith"],
    }
    method = plan.method
    lines = [
        "---",
        yaml.safe_dump(front, sort_keys=False).strip(),
        "---",
        "",
        "# Merged model",
        "",
        "This model was made with [mergesmith](https://pypi.org/project/mergesmith/), which merges the "
        "weights of fine-tuned models without training.",
        "",
        "## Method",
        "",
        f"`{method.name}`: {method.summary}."
        + (f" Base model: `{plan.base_model}`." if plan.base_model else ""),
        "",
        "## Models",
        "",
        *[f"- `{r}`" for r in refs],
        "",
        "## Configuration",
        "",
        "```yaml",
        config_text.strip(),
        "```",
        "",
    ]
    return "\n".join(lines)
