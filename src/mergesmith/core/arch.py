"""Layer structure inferred from tensor names and config.json, with no per-family tables.

A layer is found from a name segment ``<container>.<N>.`` where the container is one of the names that
transformers' layer stacks use (``layers``, ``h``, ``blocks``, ``layer``). Every name prefix before such a
segment is a separate *stack* (a language model's ``model.language_model.layers``, a vision tower's
``model.vision_tower.encoder.layers``), and every layer of a stack keeps its own tensor names, as on disk:
layers need not be alike (a dense first layer before MoE layers, attention between Mamba layers). The
*decoder* is the stack whose depth is config.json's layer count; the others are towers. Every tensor that is
not in a decoder layer is "pre" (embeddings, towers, projectors: the input side) or "post" (the decoder's
final norm, lm_head).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from mergesmith.core.errors import MergeError
from mergesmith.core.layer_config import count_from_fields

LAYER_RE = re.compile(r"(?:^|\.)(layers|h|blocks|layer|decoder_layers)\.(\d+)\.")
# config.json keys that hold the decoder's layer count (``decoder_layers``, ``num_decoder_layers``: seq2seq)
LAYER_COUNT_KEYS = (
    "num_hidden_layers",
    "n_layer",
    "num_layers",
    "n_layers",
    "decoder_layers",
    "num_decoder_layers",
    "layers",  # kosmos-2.5's text config
)
# where a multimodal config keeps its language model's keys
TEXT_CONFIG_KEYS = ("text_config", "language_config", "llm_config")
# words in a stack's prefix that say it is not the language model, and words that say it is
_TOWER_WORDS = ("vision", "visual", "audio", "image", "speech", "tower", "encoder", "vit", "projector")
_TEXT_WORDS = ("language_model", "text_model", "decoder", "llm")
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


def layer_count_keys(config: dict) -> list[str]:
    """Every layer-count key of config.json, top level first, then the language model's sub-config:
    ``["num_hidden_layers"]``, ``["text_config.num_hidden_layers"]``."""
    out = [k for k in LAYER_COUNT_KEYS if _is_count(config.get(k))]
    for sub in TEXT_CONFIG_KEYS:
        text = config.get(sub)
        if isinstance(text, dict):
            out += [f"{sub}.{k}" for k in LAYER_COUNT_KEYS if _is_count(text.get(k))]
    return out


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def layer_count_key(config: dict) -> str | None:
    """The first of :func:`layer_count_keys`, or None."""
    keys = layer_count_keys(config)
    return keys[0] if keys else None


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


def split_layer(name: str) -> tuple[str, int, str] | None:
    """``model.layers.3.mlp.up_proj.weight`` -> ``("model.layers", 3, "mlp.up_proj.weight")``."""
    m = LAYER_RE.search(name)
    if m is None:
        return None
    return name[: m.start(2) - 1], int(m.group(2)), name[m.end(2) + 1 :]


@dataclass(frozen=True)
class Stack:
    """One stack of layers: layer ``i``'s tensors are ``{prefix}.{i}.{suffix}`` for its own suffixes."""

    prefix: str
    layers: tuple[tuple[str, ...], ...]  # per layer index, its suffixes in checkpoint order

    @property
    def depth(self) -> int:
        return len(self.layers)

    def name(self, index: int, suffix: str) -> str:
        return f"{self.prefix}.{index}.{suffix}"

    def kind(self, index: int) -> frozenset[str]:
        """What layer ``index`` holds: the set of its tensor suffixes (layers of one kind hold the same)."""
        return frozenset(self.layers[index])

    @property
    def root(self) -> str:
        """The module that holds the stack: ``model.language_model`` for ``model.language_model.layers``."""
        return self.prefix.rsplit(".", 1)[0] if "." in self.prefix else ""

    def position(self, index: int) -> float:
        """Where layer ``index`` sits in its stack, in [0, 1] (a gradient's abscissa)."""
        return index / (self.depth - 1) if self.depth > 1 else 0.0

    def describe(self) -> str:
        return f"{self.prefix} ({self.depth} layers)"


@dataclass(frozen=True)
class Layout:
    """Where a model's tensors sit: the decoder's layers, each with its own tensors, and the rest.

    ``pre`` holds every tensor outside the decoder's layers that is on the input side, in checkpoint order:
    the embeddings and whole towers (vision, audio) and projectors, their layers included; ``post`` the
    decoder's final norm and lm_head."""

    decoder: Stack | None
    towers: tuple[Stack, ...]
    pre: tuple[str, ...]
    post: tuple[str, ...]
    layer_key: str | None  # config.json's key of the decoder's layer count, None if it has none

    @property
    def num_layers(self) -> int:
        return self.decoder.depth if self.decoder else 0

    def position(self, name: str) -> float:
        """The gradient position of a tensor outside the decoder: a tower layer's position in its own
        tower, 0 for anything else (embeddings, projectors)."""
        parts = split_layer(name)
        if parts:
            for tower in self.towers:
                if tower.prefix == parts[0]:
                    return tower.position(parts[1])
        return 0.0

    @classmethod
    def infer(cls, model_ref: str, names: list[str], config: dict) -> Layout:
        stacks = _stacks(names)
        key, decoder = _find_decoder(model_ref, stacks, config)
        towers = tuple(s for s in stacks if s is not decoder)
        pre: list[str] = []
        post: list[str] = []
        for name in names:
            parts = split_layer(name)
            if decoder is not None and parts and parts[0] == decoder.prefix:
                continue
            if parts is None and _is_post(name, decoder):
                post.append(name)
            else:
                pre.append(name)
        return cls(decoder, towers, tuple(pre), tuple(post), key)


def _is_post(name: str, decoder: Stack | None) -> bool:
    """lm_head, and the decoder's own non-embedding tensors (its final norm); without a decoder, everything
    but the embeddings."""
    if name.endswith("lm_head.weight"):
        return True
    if is_embedding(name):
        return False
    root = decoder.root if decoder else ""
    return not root or name.startswith(root + ".")


def _stacks(names: list[str]) -> list[Stack]:
    found: dict[str, dict[int, list[str]]] = {}
    for name in names:
        parts = split_layer(name)
        if parts:
            prefix, index, suffix = parts
            found.setdefault(prefix, {}).setdefault(index, []).append(suffix)
    return [
        Stack(prefix, tuple(tuple(layers.get(i, ())) for i in range(max(layers) + 1)))
        for prefix, layers in found.items()
    ]


def _find_decoder(model_ref: str, stacks: list[Stack], config: dict) -> tuple[str | None, Stack | None]:
    """The layer-count key and the stack it counts: the first count key that some stack's depth matches;
    several stacks of that depth are told apart by their names (language model, not a tower)."""

    keys = layer_count_keys(config)
    counts = [(k, get_nested(config, k)) for k in keys]
    if not keys:
        derived = count_from_fields(config)
        if derived is not None:
            counts = [(None, derived)]
    if (
        not stacks
    ):  # layers under names mergesmith does not know (xlm's attentions.N): merged as whole tensors
        return (counts[0][0] if counts else None), None
    if not counts:
        return None, _pick(model_ref, stacks, "config.json has no layer count")
    for key, n in counts:
        matching = [s for s in stacks if s.depth == n]
        if matching:
            return key, _pick(model_ref, matching, f"{key}={n} matches several")
    key, n = counts[0]
    shown = ", ".join(s.describe() for s in stacks)
    raise MergeError(
        f"model {model_ref!r}: config.json says {key or 'its per-layer fields give'}={n} but no layer stack of "
        f"its tensors has {n} layers ({shown}); the checkpoint and its config.json do not match"
    )


def _pick(model_ref: str, stacks: list[Stack], why: str) -> Stack:
    if len(stacks) == 1:
        return stacks[0]

    def score(stack: Stack) -> int:
        words = stack.prefix.lower().split(".")
        if any(w in part for part in words for w in _TOWER_WORDS):
            return -1
        return 1 if any(w in part for part in words for w in _TEXT_WORDS) else 0

    best = max(score(s) for s in stacks)
    top = [s for s in stacks if score(s) == best]
    if len(top) == 1:
        return top[0]
    shown = ", ".join(s.describe() for s in stacks)
    raise MergeError(
        f"model {model_ref!r}: {why} layer stacks ({shown}) and their names do not say which is the language "
        "model; mergesmith cannot tell which stack the layer ranges refer to"
    )


# Per-expert MoE tensors, as published Mixtral/Qwen-MoE checkpoints store them: ``<...>.experts.<N>.<leaf>``.
_EXPERT_RE = re.compile(r"^(.*\.experts)\.(\d+)\.([^.]+)(.*)$")
# the per-expert leaves that transformers 5 fuses into one tensor of every expert (gate_up_proj), in the order
# it stacks them; every other leaf (w2, down_proj, ...) is stacked over the experts on its own
_FUSED_PAIRS = {
    "w1": ("w1+w3", 0),
    "w3": ("w1+w3", 1),
    "gate_proj": ("gate_up_proj", 0),
    "up_proj": ("gate_up_proj", 1),
}


def expert_group(name: str) -> tuple[str, tuple[int, int]] | None:
    """For a per-expert tensor, the name of the fused tensor that transformers 5 (and so mergekit 0.1.5) makes of
    it and its siblings, and its place there (expert, part): ``...experts.3.w3.weight`` ->
    (``...experts.*.w1+w3.weight``, (3, 1)). None for any other tensor."""
    m = _EXPERT_RE.match(name)
    if m is None:
        return None
    prefix, expert, leaf, tail = m.groups()
    fused, part = _FUSED_PAIRS.get(leaf, (leaf, 0))
    return f"{prefix}.*.{fused}{tail}", (int(expert), part)
