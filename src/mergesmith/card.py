"""The model card (README.md) written beside a merged model."""

from __future__ import annotations

import yaml

from mergesmith.plan import MergePlan


def front_matter(base_models: list[str], tags: list[str]) -> list[str]:
    """The card's YAML header lines: the input models, the library and the tags."""
    front = {
        "base_model": base_models,
        "library_name": "transformers",
        "tags": tags,
    }
    return ["---", yaml.safe_dump(front, sort_keys=False).strip(), "---", ""]


def config_section(config_text: str) -> list[str]:
    """The card's last section: the config the model was built from, verbatim."""
    return ["## Configuration", "", "```yaml", config_text.strip(), "```", ""]


def model_card(plan: MergePlan, config_text: str) -> str:
    refs = list(plan.models)
    method = plan.method
    lines = [
        *front_matter(refs, ["merge", "mergesmith"]),
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
        *config_section(config_text),
    ]
    return "\n".join(lines)
