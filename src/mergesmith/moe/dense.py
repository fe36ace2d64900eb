"""What an MoE build needs to know about its dense inputs, from their headers and config.json alone.

A dense decoder layer's feed-forward block is three matrices, ``<layer>.mlp.{gate,up,down}_proj.weight``
(the SwiGLU layout of every family an MoE output accepts). They become one expert; every other tensor of
the base model is kept as it is.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from mergesmith.core.arch import layer_count_key
from mergesmith.core.errors import MergeError
from mergesmith.core.model import ModelSource

MLP_RE = re.compile(r"^(?P<prefix>.*\.\d+)\.mlp\.(?P<proj>gate|up|down)_proj\.weight$")


@dataclass(frozen=True)
class DenseLayout:
    """The feed-forward tensors of a dense model, by layer, and everything else."""

    ref: str
    model_type: str
    layer_prefixes: tuple[str, ...]  # "model.layers.0", ... in layer order
    mlp: tuple[dict[str, str], ...]  # per layer: proj ("gate"/"up"/"down") -> tensor name
    others: tuple[str, ...]  # non-MLP tensors, in checkpoint order
    hidden_size: int
    intermediate_size: int

    @property
    def num_layers(self) -> int:
        return len(self.layer_prefixes)

    @classmethod
    def of(cls, src: ModelSource) -> DenseLayout:
        model_type = src.config.get("model_type")
        if not isinstance(model_type, str):
            raise MergeError(f"model {src.ref!r}: config.json has no model_type")
        by_prefix: dict[str, dict[str, str]] = {}
        others: list[str] = []
        for name in src.tensors:
            m = MLP_RE.match(name)
            if m:
                by_prefix.setdefault(m["prefix"], {})[m["proj"]] = name
            elif ".mlp." in name:
                raise MergeError(
                    f"model {src.ref!r}: feed-forward tensor {name!r} is not a gate/up/down projection weight "
                    "(MLP biases, or a model that is already an MoE); an MoE expert cannot hold it"
                )
            else:
                others.append(name)
        if not by_prefix:
            raise MergeError(
                f"model {src.ref!r}: no feed-forward tensors named '<layer>.mlp.gate_proj.weight' "
                f"(model_type {model_type!r}); mergesmith moe needs SwiGLU gate/up/down projections"
            )
        prefixes = sorted(by_prefix, key=lambda p: (p.rsplit(".", 1)[0], int(p.rsplit(".", 1)[1])))
        for p in prefixes:
            missing = {"gate", "up", "down"} - set(by_prefix[p])
            if missing:
                raise MergeError(f"model {src.ref!r}: layer {p} has no {sorted(missing)[0]}_proj weight")
        key = layer_count_key(src.config)
        declared = src.config.get(key) if key and "." not in key else None
        if declared is not None and declared != len(prefixes):
            raise MergeError(
                f"model {src.ref!r}: config.json says {key}={declared} but it has {len(prefixes)} feed-forward layers"
            )
        first = src.tensors[by_prefix[prefixes[0]]["gate"]].shape
        return cls(
            ref=src.ref,
            model_type=model_type,
            layer_prefixes=tuple(prefixes),
            mlp=tuple(by_prefix[p] for p in prefixes),
            others=tuple(others),
            hidden_size=first[1],
            intermediate_size=first[0],
        )

    def check_expert(self, expert: DenseLayout, src: ModelSource, base: ModelSource, what: str) -> None:
        """An expert must be of the base's family and have the base's feed-forward shapes, layer by layer
        (``what`` names it in errors). A shared expert may differ in intermediate size only."""
        if expert.model_type != self.model_type:
            raise MergeError(
                f"{what} {expert.ref!r} is a {expert.model_type!r} model but the base model {self.ref!r} is "
                f"{self.model_type!r}; all experts must share the base model's architecture"
            )
        if expert.num_layers != self.num_layers:
            raise MergeError(
                f"{what} {expert.ref!r} has {expert.num_layers} layers but the base model has {self.num_layers}"
            )
        shared = what == "shared expert"
        for layer, (mine, theirs) in enumerate(zip(self.mlp, expert.mlp)):
            for proj in ("gate", "up", "down"):
                want = base.tensors[mine[proj]].shape
                got = src.tensors[theirs[proj]].shape
                if shared:
                    hidden_dim = 1 if proj != "down" else 0
                    ok = got[hidden_dim] == want[hidden_dim] and (
                        got[1 - hidden_dim] == expert.intermediate_size
                    )
                else:
                    ok = got == want
                if not ok:
                    raise MergeError(
                        f"{what} {expert.ref!r}: tensor {theirs[proj]!r} in layer {layer} has shape {list(got)} "
                        f"but the base model's is {list(want)}; experts must have the same shapes"
                    )
