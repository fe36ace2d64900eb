"""The model card (README.md) written beside a merged model, and the pieces the MoE card shares.

A card is published with the model, so it holds no local path: a model given as a folder is named by
the folder's name (in the text; the front matter's ``base_model`` lists only Hub repo ids, as the Hub's
metadata expects), and the config shown in the card has those paths replaced the same way. Any text
that comes from the user (the config, a chat template inside it, model names) is quoted so that it
cannot end its code span or fence and inject markup.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from pathlib import Path

import yaml

from mergesmith.pipeline.plan import MergePlan

PAPERS: dict[str, tuple[str, str]] = {
    "linear": (
        "Model soups: averaging weights of multiple fine-tuned models improves accuracy without "
        "increasing inference time",
        "https://arxiv.org/abs/2203.05482",
    ),
    "task_arithmetic": ("Editing Models with Task Arithmetic", "https://arxiv.org/abs/2212.04089"),
    "ties": ("TIES-Merging: Resolving Interference When Merging Models", "https://arxiv.org/abs/2306.01708"),
    "dare_linear": (
        "Language Models are Super Mario: Absorbing Abilities from Homologous Models as a Free Lunch",
        "https://arxiv.org/abs/2311.03099",
    ),
    "breadcrumbs": (
        "Model Breadcrumbs: Scaling Multi-Task Model Merging with Sparse Masks",
        "https://arxiv.org/abs/2312.06795",
    ),
    "della": (
        "DELLA-Merging: Reducing Interference in Model Merging through Magnitude-Based Sampling",
        "https://arxiv.org/abs/2406.11617",
    ),
    "sce": ("FuseChat: Knowledge Fusion of Chat Models", "https://arxiv.org/abs/2408.07990"),
    "model_stock": (
        "Model Stock: All we need is just a few fine-tuned models",
        "https://arxiv.org/abs/2403.19522",
    ),
    "ram": ("Behavior Knowledge Merge in Reinforced Agentic Models", "https://arxiv.org/abs/2601.13572"),
    "tsv": (
        "Task Singular Vectors: Reducing Task Interference in Model Merging",
        "https://arxiv.org/abs/2412.00081",
    ),
    "iso_c": (
        "No Task Left Behind: Isotropic Model Merging with Common and Task-Specific Subspaces",
        "https://arxiv.org/abs/2502.04959",
    ),
}
"""Method -> (paper title, arXiv link), from docs/methods.md; methods without a paper are absent."""
PAPERS |= {
    "dare_ties": PAPERS["dare_linear"],
    "breadcrumbs_ties": PAPERS["breadcrumbs"],
    "della_linear": PAPERS["della"],
    "iso_cts": PAPERS["iso_c"],
}

HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


def _longest_run(text: str, char: str = "`") -> int:
    return max((len(m) for m in re.findall(f"{re.escape(char)}+", text)), default=0)


def fenced(text: str, info: str = "") -> list[str]:
    """A code block whose fence is longer than any backtick run inside ``text``, so it cannot be closed
    from inside."""
    fence = "`" * max(3, _longest_run(text) + 1)
    return [fence + info, text.rstrip("\n"), fence]


def code(text: str) -> str:
    """An inline code span that ``text`` cannot end (CommonMark: a longer backtick string, padded)."""
    ticks = "`" * (_longest_run(text) + 1)
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{ticks}{pad}{text}{pad}{ticks}"


def _is_local(name: str) -> bool:
    return Path(name).expanduser().exists() or name.startswith((".", "/", "~")) or not HUB_ID.match(name)


def hub_id(ref: str) -> str | None:
    """``org/name`` for a Hub reference (revision dropped), None for a local folder or a LoRA pair."""
    if "+" in ref and not Path(ref).expanduser().exists():
        return None
    name = ref.rpartition("@")[0] if "@" in ref and not Path(ref).exists() else ref
    return None if _is_local(name) else name


def display_name(ref: str) -> str:
    """How the card names a model: a Hub reference as given, a local folder by its own name."""
    if "+" in ref and not Path(ref).expanduser().exists():
        model, _, adapter = ref.partition("+")
        return f"{display_name(model)}+{display_name(adapter)}"
    if hub_id(ref) is not None:
        return ref
    name = ref.rpartition("@")[0] if "@" in ref and not Path(ref).exists() else ref
    return Path(os.path.realpath(Path(name).expanduser())).name or name


def model_line(ref: str) -> str:
    """A list item for the card: a Hub model linked, a local one by name only."""
    repo = hub_id(ref)
    if repo is not None:
        return f"- [{repo}](https://huggingface.co/{repo})"
    return f"- {code(display_name(ref))} (a local folder)"


def public_text(text: str, refs: Iterable[str]) -> str:
    """``text`` with every local model path of ``refs`` (as written, and absolute) replaced by its name."""
    subs: dict[str, str] = {}
    for ref in refs:
        for part in ref.split("+") if "+" in ref and not Path(ref).expanduser().exists() else [ref]:
            if hub_id(part) is not None:
                continue
            name = display_name(part)
            for form in {
                part,
                str(Path(part).expanduser().absolute()),
                os.path.realpath(Path(part).expanduser()),
            }:
                if form and form != name:
                    subs[form] = name
    for form in sorted(subs, key=len, reverse=True):  # longest first: a path never half-replaced
        text = text.replace(form, subs[form])
    return text


def front_matter(base_models: Iterable[str], tags: list[str]) -> list[str]:
    """The card's YAML header lines: the Hub models it was built from, the library and the tags."""
    repos = list(dict.fromkeys(r for r in (hub_id(m) for m in base_models) if r is not None))
    front: dict = {"base_model": repos} if repos else {}
    front |= {"library_name": "transformers", "tags": tags}
    return ["---", yaml.safe_dump(front, sort_keys=False).strip(), "---", ""]


def title(name: str) -> str:
    """The card's heading: the output folder's name, with Markdown's special characters escaped."""
    return "# " + re.sub(r"([\\`*_{}\[\]<>()#+!|])", r"\\\1", name)


def config_section(config_text: str, refs: Iterable[str] = ()) -> list[str]:
    """The card's last section: the config the model was built from, with local paths as folder names."""
    return ["## Configuration", "", *fenced(public_text(config_text.strip(), refs), "yaml"), ""]


def method_line(name: str, summary: str) -> str:
    paper = PAPERS.get(name)
    link = f" Paper: [{paper[0]}]({paper[1]})." if paper else ""
    return f"{code(name)}: {summary}.{link}"


def model_card(plan: MergePlan, config_text: str, name: str = "Merged model") -> str:
    refs = list(plan.models)
    method = plan.method
    base = f" Base model: {code(display_name(plan.base_model))}." if plan.base_model else ""
    lines = [
        *front_matter(refs, ["merge", "mergesmith"]),
        title(name),
        "",
        "This model was made with [mergesmith](https://pypi.org/project/mergesmith/), which merges the "
        "weights of fine-tuned models without training.",
        "",
        "## Method",
        "",
        method_line(method.name, method.summary) + base,
        "",
        "## Models",
        "",
        *[model_line(r) for r in refs],
        "",
        *config_section(config_text, refs),
    ]
    return "\n".join(lines)
