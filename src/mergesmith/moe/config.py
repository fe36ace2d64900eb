"""The YAML config of ``mergesmith moe`` (mergekit-moe's format), as strict pydantic models.

Unknown keys, wrong types and inconsistent combinations are one-line errors that name the key. Checks
that need no model (experts_per_token against the expert count, missing or identical prompt sets) are
made here, before any file is opened.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from mergesmith.core.errors import ConfigError
from mergesmith.pipeline.config import Count, ModelRef, _format_validation_error, load_yaml_documents

GateMode = Literal[
    "hidden",
    "hidden_last",
    "hidden_avg",
    "hidden_mean",
    "cheap_embed",
    "random",
    "uniform_random",
    "calibrated",
]
#: Aliases, resolved once: mergekit's ``hidden`` is the last-token variant.
GATE_ALIASES: dict[str, str] = {"hidden_last": "hidden", "hidden_mean": "hidden_avg"}
#: Modes whose router rows come from prompts; every expert then needs ``positive_prompts``.
PROMPT_MODES = frozenset({"hidden", "hidden_avg", "cheap_embed", "calibrated"})
RANDOM_MODES = frozenset({"random", "uniform_random"})
DOCS = "docs/moe.md"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Expert(_Strict):
    """One dense model whose feed-forward blocks become one expert (or the shared expert)."""

    source_model: ModelRef
    positive_prompts: list[str] | None = None
    negative_prompts: list[str] | None = None
    noise_scale: float | None = Field(default=None, ge=0, allow_inf_nan=False)
    residual_scale: float | None = Field(default=None, allow_inf_nan=False)

    def prompt_key(self) -> tuple[frozenset[str], frozenset[str]]:
        return frozenset(self.positive_prompts or ()), frozenset(self.negative_prompts or ())


class Calibration(_Strict):
    """Options of ``gate_mode: calibrated`` (mergesmith's own mode; see docs/moe.md)."""

    #: Upper bound on the mean top-1 router probability over the calibration tokens.
    target_top1: float = Field(default=0.97, gt=0.0, lt=1.0)
    #: Which prompt tokens are calibration samples: every token after the special ones, or the last one.
    tokens: Literal["all", "last"] = "all"
    #: Covariance shrinkage in [0, 1] for the whitening; null picks it by cross-validation over the
    #: calibration prompts, ``ledoit_wolf`` by the Ledoit-Wolf formula (the choice before answer tokens).
    shrinkage: (
        Annotated[float, Field(ge=0.0, le=1.0, allow_inf_nan=False)] | Literal["ledoit_wolf"] | None
    ) = None
    #: Whose feed-forward blocks the prompt pass runs: each expert's own prompts through the base with
    #: that expert's MLPs (``expert``: what the MoE computes when its routing is right), or the base only.
    trunk: Literal["expert", "base"] = "expert"
    #: Tokens of each expert's own greedy continuation of its prompts (generated at build time) that are
    #: calibration samples too: the MoE routes the answer tokens it generates, not only the prompt's.
    #: 0 calibrates on prompt tokens only.
    max_new_tokens: Count = Field(default=32, ge=0)


class MoEConfig(_Strict):
    base_model: ModelRef
    experts: list[Expert] = Field(min_length=1)
    gate_mode: GateMode = "hidden"
    dtype: str | None = None
    experts_per_token: Count = 2
    shared_experts: list[Expert] | None = None
    architecture: str | None = None
    calibration: Calibration | None = None

    @property
    def mode(self) -> str:
        """The gate mode with aliases resolved: hidden, hidden_avg, cheap_embed, calibrated, random, ..."""
        return GATE_ALIASES.get(self.gate_mode, self.gate_mode)

    @property
    def shared_expert(self) -> Expert | None:
        return self.shared_experts[0] if self.shared_experts else None

    @model_validator(mode="after")
    def _consistent(self):
        n = len(self.experts)
        if self.experts_per_token < 1:
            raise ValueError(f"experts_per_token is {self.experts_per_token}; it must be at least 1")
        if self.experts_per_token > n:
            raise ValueError(
                f"experts_per_token is {self.experts_per_token} but there {'is' if n == 1 else 'are'} only "
                f"{n} expert{'' if n == 1 else 's'}; "
                f"lower it to at most {n}"
            )
        if self.shared_experts is not None and len(self.shared_experts) > 1:
            raise ValueError(f"{len(self.shared_experts)} shared_experts given; at most one is supported")
        if self.calibration is not None and self.mode != "calibrated":
            raise ValueError(f"'calibration' is only used with gate_mode: calibrated, not {self.gate_mode}")
        if self.mode in PROMPT_MODES:
            _check_prompts(self.experts, self.gate_mode)
        return self


def _check_prompts(experts: list[Expert], gate_mode: str) -> None:
    """Every expert needs positive prompts, and no two experts may have the same prompt sets."""
    for i, e in enumerate(experts):
        if not e.positive_prompts:
            raise ValueError(
                f"expert {i} ({e.source_model}) has no positive_prompts; gate_mode {gate_mode} builds its "
                "router row from them (give some, or use gate_mode: random for a router you will train)"
            )
        if any(not p.strip() for p in [*(e.positive_prompts or []), *(e.negative_prompts or [])]):
            raise ValueError(f"expert {i} ({e.source_model}) has an empty prompt")
    seen: dict[tuple[frozenset[str], frozenset[str]], int] = {}
    for i, e in enumerate(experts):
        j = seen.setdefault(e.prompt_key(), i)
        if j != i:
            raise ValueError(
                f"experts {j} ({experts[j].source_model}) and {i} ({e.source_model}) have identical prompt "
                "sets, so their routers would be identical and the router could never tell them apart; "
                "give each expert prompts of its own"
            )


def parse_moe_config(data: Any, source: str = "config") -> MoEConfig:
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: an MoE config must be a YAML mapping, got {type(data).__name__}")
    try:
        return MoEConfig.model_validate(data)
    except ValidationError as exc:
        # pydantic prefixes our own checks' messages with "Value error, "; the message says enough.
        msg = _format_validation_error(exc, source, docs=DOCS).replace(": Value error, ", ": ")
        raise ConfigError(msg) from None


def load_moe_config(config: str | Path | dict | MoEConfig) -> MoEConfig:
    """An MoEConfig from a path, a YAML string, a dict or an MoEConfig."""
    if isinstance(config, MoEConfig):
        return config
    if isinstance(config, dict):
        return parse_moe_config(config)
    docs, label = load_yaml_documents(config)
    if len(docs) > 1:
        raise ConfigError(f"{label}: has {len(docs)} YAML documents; an MoE config is one document")
    return parse_moe_config(docs[0], label)
