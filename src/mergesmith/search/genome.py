"""The searched space: a flat vector of merge parameters and the plain merge config it stands for.

As in mergekit-evolve, the decoder's layers are cut into blocks of ``layer_granularity`` layers (0: the
whole model is one block), and each block gets one value per model for every per-model parameter
(``weight``, ``density``) and one value for every global one (``t``), once per ``filters`` entry plus once
for every other tensor. A vector becomes a merge config whose parameters are lists over the layers
(gradients, which the plan resolves per layer; :mod:`mergesmith.pipeline.params`): a block's value
repeated over its layers, or with ``smooth`` one anchor per block, interpolated between them. Filters
become ``{filter, value}`` entries, the last one without a filter. Tensors outside the decoder layers
(embeddings, final norm, lm_head) take the value at the first layer, the plan's rule for them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mergesmith.core.errors import ConfigError
from mergesmith.methods import Method, get_method
from mergesmith.search.config import Genome, SearchConfig, searched_params

#: Digits kept of every searched value: the config stays readable and a 1e-4 change is far below what
#: a merge's score can tell apart; the same rounded values are merged, scored and written to best.yml.
DIGITS = 4
# density: the methods take (0, 1] (0 would keep nothing), so the search stops at 0.01
DEFAULT_BOUNDS = {"weight": (0.0, 2.0), "density": (0.01, 1.0), "t": (0.0, 1.0), "lambda": (0.0, 3.0)}
# mergekit-evolve sets normalize: true for these methods when the genome leaves it out
NORMALIZED_BY_DEFAULT = ("ties", "dare_ties", "linear")


@dataclass(frozen=True)
class Gene:
    """One coordinate of the vector: a parameter of one model (or of the merge) in one block."""

    param: str
    model: int | None  # index into genome.models; None for a global parameter (t)
    group: int  # index into filters + [everything else]
    block: int

    def label(self, models: list[str], groups: list[str]) -> str:
        who = f"{models[self.model]}." if self.model is not None else ""
        return f"{who}{self.param}.{groups[self.group]}.{self.block}"


def model_ref(ref: str) -> str:
    """A local model folder as an absolute path (best.yml then merges from anywhere); other references
    (hub names, ``model+adapter``) as given."""
    p = Path(ref).expanduser()
    return str(p.resolve()) if p.exists() else ref


class SearchSpace:
    """The genes of one search config for a model with ``num_layers`` decoder layers."""

    def __init__(self, config: SearchConfig, num_layers: int):
        g: Genome = config.genome
        self.genome = g
        self.method: Method = get_method(g.merge_method)
        self.num_layers = num_layers
        gran = g.layer_granularity
        if gran > 0 and num_layers % gran:
            raise ConfigError(
                f"genome.layer_granularity {gran} does not divide the model's {num_layers} layers; "
                f"use a divisor of {num_layers} (or 0 for one value per model)"
            )
        self.blocks = num_layers // gran if gran > 0 and num_layers > 0 else 1
        self.groups = [*(g.filters or []), "rest"]
        stems = [Path(m).name or m for m in g.models]
        self.model_labels = (
            stems if len(set(stems)) == len(stems) else [f"{i}-{s}" for i, s in enumerate(stems)]
        )
        self.normalize = normalize_of(g, self.method)
        params = searched_params(self.method, self.normalize)
        self.params = [p.name for p in params]
        self.genes: list[Gene] = []
        for p in params:
            owners: list[int | None] = list(range(len(g.models))) if p.per_model else [None]
            for owner in owners:
                for group in range(len(self.groups)):
                    for block in range(self.blocks):
                        self.genes.append(Gene(p.name, owner, group, block))
        opt = config.optimizer
        bounds = {**DEFAULT_BOUNDS, **(opt.bounds or {})}
        if g.allow_negative_weights and "weight" not in (opt.bounds or {}):
            bounds["weight"] = (-2.0, 2.0)
        self.bounds = np.array([bounds[gene.param] for gene in self.genes], dtype=np.float64)
        init = {"weight": 1.0 / len(g.models), "density": 1.0, "t": 0.5, "lambda": 1.0, **(opt.init or {})}
        for name, value in init.items():
            lo, hi = bounds[name]
            if not lo <= value <= hi:
                raise ConfigError(f"optimizer.init.{name} {value} lies outside its range [{lo}, {hi}]")
        self.x0 = np.array([init[gene.param] for gene in self.genes], dtype=np.float64)

    @property
    def dim(self) -> int:
        return len(self.genes)

    def labels(self) -> list[str]:
        return [gene.label(self.model_labels, self.groups) for gene in self.genes]

    def clip(self, x: np.ndarray) -> tuple[float, ...]:
        """``x`` inside the bounds, rounded to :data:`DIGITS` places: the candidate that is evaluated."""
        x = np.clip(np.asarray(x, dtype=np.float64), self.bounds[:, 0], self.bounds[:, 1])
        return tuple(round(float(v), DIGITS) + 0.0 for v in x)  # + 0.0: no -0.0

    def from_unit(self, u: np.ndarray) -> tuple[float, ...]:
        """The candidate of a point of the optimiser's unit cube (each parameter scaled to its bounds)."""
        lo, hi = self.bounds[:, 0], self.bounds[:, 1]
        return self.clip(lo + np.clip(u, 0, 1) * (hi - lo))

    def _values(self, x: tuple[float, ...]) -> dict[tuple[str, int | None], Any]:
        """Config value of every (parameter, owner) from the vector."""
        by_key: dict[tuple[str, int | None, int], list[float]] = {}
        for gene, v in zip(self.genes, x, strict=True):
            by_key.setdefault((gene.param, gene.model, gene.group), [0.0] * self.blocks)[gene.block] = v
        out: dict[tuple[str, int | None], Any] = {}
        for (param, owner, group), blocks in by_key.items():
            value = self._over_layers(blocks)
            if len(self.groups) == 1:
                out[(param, owner)] = value
                continue
            entries = out.setdefault((param, owner), [])
            name = self.groups[group]
            entries.append(
                {"filter": name, "value": value} if group < len(self.groups) - 1 else {"value": value}
            )
        return out

    def _over_layers(self, blocks: list[float]) -> Any:
        if self.blocks == 1:
            return blocks[0]
        if self.genome.smooth:
            return list(blocks)  # anchors spread over the layers, interpolated between (a gradient)
        gran = self.genome.layer_granularity
        return [v for v in blocks for _ in range(gran)]  # one value per layer: a step per block

    def to_config(self, x: tuple[float, ...]) -> dict[str, Any]:
        """The plain merge config (a dict, best.yml's content) of candidate ``x``."""
        g = self.genome
        values = self._values(x)
        models = []
        for i, ref in enumerate(g.models):
            params = {p: values[(p, i)] for p in self.params if (p, i) in values}
            models.append({"model": model_ref(ref), "parameters": params})
        top: dict[str, Any] = {p: values[(p, None)] for p in self.params if (p, None) in values}
        if "normalize" in self.method.param_index and (g.normalize is not None or self.normalize):
            top["normalize"] = self.normalize
        config: dict[str, Any] = {"merge_method": g.merge_method}
        if g.base_model is not None:
            config["base_model"] = model_ref(g.base_model)
        config["models"] = models
        if top:
            config["parameters"] = top
        if g.dtype is not None:
            config["dtype"] = g.dtype
        if g.tokenizer_source is not None:
            config["tokenizer_source"] = model_ref(g.tokenizer_source)
        return config


def normalize_of(genome: Genome, method: Method) -> bool:
    """Whether the merge normalizes the weights: the genome's ``normalize``, else mergekit-evolve's rule
    (true for ties, dare_ties and linear), else the method's default."""
    if genome.normalize is not None:
        return genome.normalize
    if genome.merge_method in NORMALIZED_BY_DEFAULT:
        return True
    spec = method.param_index.get("normalize")
    return bool(spec.default) if spec is not None else False
