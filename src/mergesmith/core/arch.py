"""Layer structure inferred from tensor names and config.json, with no per-family tables.

A decoder layer is found from a name segment ``<container>.<N>.`` where the container is one of the names
that transformers' decoder stacks use (``layers``, ``h``, ``blocks``, ``layer``); the layer count comes from
config.json's layer-count key. Everything that is not in a layer is "pre" (embeddings, feeding the first
layer) or "post" (final norm, lm_head).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from mergesmith.core.errors import MergeError

LAYER_RE = re.compile(r"(?:^|\.)(layers|h|blocks|layer|decoder_layers)\.(\d+)\.")
LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")
EMBED_MARKERS = ("embed", "wte", "wpe", "word_embeddings", "tok_embeddings", "position_embeddings")
LM_HEAD_NAMES = ("lm_head.weight",)


def layer_of(name: str) -> int | None:
    m = LAYER_RE.search(name)
    return int(m.group(2)) if m else None


def layer_template(name: str) -> str:
    """The name with its layer index replaced by ``{}``: ``model.layers.{}.mlp.up_proj.weight``."""
    m = LAYER_RE.search(name)
    assert m is not None
    return name[: m.start(2)] + "{}" + name[m.end(2) :]


def is_embedding(name: str) -> bool:
    """Vocabulary-indexed tensors: input embeddings and the output head."""
    return name in LM_HEAD_NAMES or name.endswith("lm_head.weight") or any(m in name for m in EMBED_MARKERS)


def is_pre(name: str) -> bool:
    """Non-layer tensors that sit before the first layer (they come from the first slice's models)."""
    return (
        name not in LM_HEAD_NAMES
        and not name.endswith("lm_head.weight")
        and any(m in name for m in EMBED_MARKERS)
    )


def layer_count_key(config: dict) -> str | None:
    for key in LAYER_COUNT_KEYS:
        if isinstance(config.get(key), int):
            return key
    text = config.get("text_config")
    if isinstance(text, dict):
        for key in LAYER_COUNT_KEYS:
            if isinstance(text.get(key), int):
                return f"text_config.{key}"
    return None


def get_nested(config: dict, key: str):
    for part in key.split("."):
        config = config[part]
    return config


def set_nested(config: dict, key: str, value) -> None:
    *parents, last = key.split(".")
    for part in parents:
        config = config[part]
    config[last] = value


def tie_word_embeddings(config: dict) -> bool:
    """transformers' default for ``tie_word_embeddings`` is True unless the config says otherwise."""
    if "tie_word_embeddings" in config:
        return bool(config["tie_word_embeddings"])
    text = config.get("text_config")
    if isinstance(text, dict) and "tie_word_embeddings" in text:
        return bool(text["tie_word_embeddings"])
    return True


@dataclass(frozen=True)
class Layout:
    """Where a model's tensors sit: per-layer templates and the tensors outside the layers."""

    num_layers: int
    layer_templates: tuple[str, ...]  # in checkpoint order, with "{}" for the layer index
    pre: tuple[str, ...]
    post: tuple[str, ...]
    layer_key: str | None

    @classmethod
    def infer(cls, model_ref: str, names: list[str], config: dict) -> Layout:
        templates: dict[str, set[int]] = {}
        pre: list[str] = []
        post: list[str] = []
        for name in names:
            idx = layer_of(name)
            if idx is None:
                (pre if is_pre(name) else post).append(name)
            else:
                templates.setdefault(layer_template(name), set()).add(idx)
        key = layer_count_key(config)
        found = max((max(ix) + 1 for ix in templates.values()), default=0)
        num_layers = get_nested(config, key) if key else found
        if key and found and found != num_layers:
            raise MergeError(
                f"model {model_ref!r}: config.json says {key}={num_layers} but its tensors have {found} layers"
            )
        return cls(num_layers, tuple(templates), tuple(pre), tuple(post), key)
