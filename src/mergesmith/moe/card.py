"""The model card (README.md) written beside an MoE built by ``mergesmith moe``."""

from __future__ import annotations

from typing import TYPE_CHECKING

from mergesmith.pipeline.card import code, config_section, display_name, front_matter, model_line, title

if TYPE_CHECKING:
    from mergesmith.moe.build import MoEPlan

GATE_SUMMARIES = {
    "hidden": "each router row is the base model's normalised hidden state at the last token of that "
    "expert's prompts (minus its negative prompts), taken at the layer's input",
    "hidden_avg": "each router row is the base model's normalised hidden state averaged over the tokens of "
    "that expert's prompts (minus its negative prompts), taken at the layer's input",
    "cheap_embed": "each router row is the normalised sum of the input embeddings of that expert's prompt "
    "tokens, the same in every layer",
    "calibrated": "each layer's router is a linear discriminant of the base model's feed-forward inputs on "
    "the experts' prompts, with its temperature fitted so that routing is confident but not one-hot",
    "random": "routers are random (N(0, 1)); train them before use",
    "uniform_random": "routers are random (U(-1/sqrt(d), 1/sqrt(d))); train them before use",
}


def moe_card(plan: MoEPlan, config_text: str, name: str = "Mixture of experts") -> str:
    cfg = plan.config
    refs = list(dict.fromkeys([cfg.base_model, *(e.source_model for e in cfg.experts)]))
    if cfg.shared_expert is not None:
        refs = list(dict.fromkeys([*refs, cfg.shared_expert.source_model]))
    experts = [f"{i}. {code(display_name(e.source_model))}" for i, e in enumerate(cfg.experts)]
    shared = (
        [
            "Shared expert (always active, sigmoid-gated): "
            f"{code(display_name(cfg.shared_expert.source_model))}.",
            "",
        ]
        if cfg.shared_expert is not None
        else []
    )
    lines = [
        *front_matter(refs, ["moe", "merge", "mergesmith"]),
        title(name),
        "",
        f"A mixture of experts: a {plan.family.name} model ({plan.family.architecture}) made with "
        "[mergesmith](https://pypi.org/project/mergesmith/) from dense models without training: the "
        f"feed-forward blocks of {len(cfg.experts)} models are the experts, attention, norms and embeddings "
        f"come from {code(display_name(cfg.base_model))}, and each token is routed to "
        f"{cfg.experts_per_token} of the experts.",
        "",
        "## Routers",
        "",
        f"{code('gate_mode: ' + cfg.gate_mode)}: {GATE_SUMMARIES[cfg.mode]}.",
        "",
        "## Experts",
        "",
        *experts,
        "",
        *shared,
        "## Models",
        "",
        *[model_line(r) for r in refs],
        "",
        *config_section(config_text, refs),
    ]
    return "\n".join(lines)
