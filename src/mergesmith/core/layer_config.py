"""The per-layer fields of config.json, and their rewrite when a passthrough reorders or repeats layers.

A config describes its layers in four shapes, each known by its key (no guessing from a list's length: a
2-layer model has many lists of length 2 that are not per layer):

- a list with one value per layer (``layer_types``, ``mlp_layer_types``) or a string with one character
  per layer (``hybrid_override_pattern``): the output's layer ``i`` takes its source layer's entry;
- a list of layer numbers (``mlp_only_layers``, ``attn_layer_indices``): it lists the output layers whose
  source layer it listed;
- a mapping keyed by layer number (``per_layer_config``): the output's layer ``i`` takes its source layer's
  entry, if it had one;
- a rule over layer numbers (``first_k_dense_replace``, jamba's ``attn_layer_period``/``offset``): the
  rule is kept when it gives every output layer its source layer's kind, refitted where the rule allows
  (a dense prefix), else the merge is refused naming the field.

Fields known to depend on the layer order in ways not rewritten here are refused, and so is an unknown field
whose name speaks of layers and that has one entry per layer. Last, a safety net: when the layers hold
different tensors and the known fields do not say which layer is of which kind, any reordering is refused.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from mergesmith.core.errors import MergeError

# one value per layer
VALUE_KEYS = (
    "layer_types",
    "mlp_layer_types",
    "layers_block_type",
    "no_rope_layers",  # one 0/1 flag per layer, despite the name
    "layer_rope_theta",
    "num_attention_heads_per_layer",
    "num_key_value_heads_per_layer",
    "attn_layers",
    "block_types",
    "indexer_types",
)
# one character per layer
STRING_KEYS = ("hybrid_override_pattern",)
# lists of layer numbers, with the number of the first layer
INDEX_KEYS = {
    "mlp_only_layers": 0,
    "attn_layer_indices": 0,
    "moe_layers": 0,
    "cross_attention_layers": 0,
    "local_layer_ids": 0,
    "full_attn_idxs": 0,
    "rope_scaling_layers": 0,
    "index_layers": 0,
    "ple_layer_ids": 1,
}
# mappings keyed by layer number
MAPPING_KEYS = ("per_layer_config",)
# lists that speak of layers but describe something else (multi-token-prediction layers, feature taps)
NOT_PER_LAYER = (
    "mtp_layers_block_type",
    "mtp_layer_types",
    "mtp_mlp_layer_types",
    "mtp_local_layer_ids",
    "vision_feature_layer",
    "encode_proj_layers",
    "extract_layers",
    "target_layer_ids",
    "intermediate_layers_indices",
)


@dataclass(frozen=True)
class Rule:
    """A layer kind computed from fields and the layer number; ``refit``: new field values that give the
    wanted kinds, or None where the rule cannot."""

    fields: tuple[str, ...]
    kind: Callable[[dict, int, int], Any]  # (config, layer, layer count) -> the layer's kind
    unless: tuple[str, ...] = ()  # fields that override the rule when present (the rule is then unused)
    refit: Callable[[list[Any]], dict | None] | None = None


def _prefix_true(kinds: list[Any], field: str) -> dict | None:
    """``{field: k}`` where the kinds are k True then only False."""
    k = sum(1 for x in kinds if x)
    return {field: k} if all(kinds[:k]) and not any(kinds[k:]) else None


def _suffix_true(kinds: list[Any], field: str) -> dict | None:
    k = sum(1 for x in kinds if x)
    n = len(kinds)
    return {field: k} if all(kinds[n - k :]) and not any(kinds[: n - k]) else None


def _period(c: dict, i: int, stem: str) -> bool:
    period = c.get(f"{stem}_period") or 1
    return i % period == (c.get(f"{stem}_offset") or 0)


def _dense_prefix(field: str) -> Rule:
    """The first ``config[field]`` layers are dense, the others MoE."""
    return Rule((field,), lambda c, i, n: i < c[field], refit=lambda kinds: _prefix_true(kinds, field))


RULES = (
    _dense_prefix("first_k_dense_replace"),
    _dense_prefix("num_dense_layers"),
    Rule(
        ("moe_layer_freq",), lambda c, i, n: isinstance(c["moe_layer_freq"], int) and i % c["moe_layer_freq"]
    ),
    Rule(("decoder_sparse_step",), lambda c, i, n: (i + 1) % max(int(c["decoder_sparse_step"] or 1), 1)),
    Rule(
        ("interleave_moe_layer_step",),
        lambda c, i, n: (i + 1) % max(int(c["interleave_moe_layer_step"] or 1), 1),
        unless=("moe_layers",),
    ),
    Rule(("attn_layer_period", "attn_layer_offset"), lambda c, i, n: _period(c, i, "attn_layer")),
    Rule(("expert_layer_period", "expert_layer_offset"), lambda c, i, n: _period(c, i, "expert_layer")),
    Rule(
        ("sliding_window_pattern",),
        lambda c, i, n: (i + 1) % max(int(c["sliding_window_pattern"] or 1), 1),
        unless=("layer_types",),
    ),
    Rule(
        ("max_window_layers",),
        lambda c, i, n: bool(c.get("use_sliding_window")) and i >= c["max_window_layers"],
        unless=("layer_types",),
    ),
    Rule(
        ("num_kv_shared_layers",),
        lambda c, i, n: i >= n - (c["num_kv_shared_layers"] or 0),
        refit=lambda kinds: _suffix_true(kinds, "num_kv_shared_layers"),
    ),
)
# fields that make a layer's meaning depend on other layers or on the layer count in ways not rewritten
# here; refused (when set) by any passthrough that changes the layers
REFUSED = {
    "kv_source_layers": "it names, for each layer, another layer whose keys and values it reads",
    "moe_layer_start_index": "it places MoE layers by layer number",
    "moe_layer_end_index": "it places MoE layers by layer number",
    "moe_layer_interval": "it places MoE layers by layer number",
    "hidden_size_per_layer_input": "tensors outside the layers hold one block per layer",
}


def count_from_fields(config: dict) -> int | None:
    """The layer count of a config that has no count key (nemotron_h): the length of a per-layer field."""
    for key in (*VALUE_KEYS, *STRING_KEYS):
        value = config.get(key)
        if isinstance(value, (list, str)) and value:
            return len(value)
    return None


def rewrite_layer_fields(
    config: dict,
    where: str,
    source: Sequence[int],
    kinds: Sequence[frozenset[str]],
) -> None:
    """Rewrite ``config`` (the dict that holds the decoder's fields; ``where`` names it in errors) for an
    output whose layer ``i`` is the source's layer ``source[i]``; ``kinds``: what each source layer holds
    (its tensor names), for the safety net. Raises MergeError naming a field it cannot rewrite."""
    n = len(kinds)
    m = len(source)
    if list(source) == list(range(n)):
        return
    described: list[list[Any]] = [[] for _ in range(n)]  # what the config says of each source layer
    updates: dict[str, Any] = {}

    def field(key: str) -> str:
        return f"{where}{key}"

    for key, value in config.items():
        if key in VALUE_KEYS and isinstance(value, list) and value:
            if (
                len(value) < n
            ):  # (longer lists occur: no_rope_layers may be; entries past the last are unused)
                raise MergeError(
                    f"config.json field {field(key)!r} has {len(value)} entries for {n} layers; mergesmith cannot "
                    "rewrite it for a passthrough that changes the layers"
                )
            updates[key] = [value[s] for s in source]
            _describe(described, lambda j, v=value: v[j])
        elif key in STRING_KEYS and isinstance(value, str) and value:
            if len(value) != n:
                raise MergeError(
                    f"config.json field {field(key)!r} has {len(value)} characters for {n} layers; mergesmith "
                    "cannot rewrite it for a passthrough that changes the layers"
                )
            updates[key] = "".join(value[s] for s in source)
            _describe(described, lambda j, v=value: v[j])
        elif key in INDEX_KEYS and isinstance(value, list):
            base = INDEX_KEYS[key]
            if not all(isinstance(x, int) and not isinstance(x, bool) for x in value):
                raise MergeError(
                    f"config.json field {field(key)!r} should list layer numbers; mergesmith cannot rewrite {value!r}"
                )
            listed = set(value)
            updates[key] = [i + base for i, s in enumerate(source) if s + base in listed]
            _describe(described, lambda j, listed=listed, base=base: j + base in listed)
        elif key in MAPPING_KEYS and isinstance(value, dict):
            entries = {_layer_number(k, field(key)): v for k, v in value.items()}
            updates[key] = {str(i): entries[s] for i, s in enumerate(source) if s in entries}
            _describe(described, lambda j, e=entries: repr(e.get(j)))
        elif key in REFUSED and value not in (None, 0, [], False):
            raise MergeError(
                f"config.json field {field(key)!r}={value!r} cannot be rewritten for a passthrough that changes "
                f"the layers ({REFUSED[key]}); merge without reordering or repeating layers"
            )
        elif (
            key not in NOT_PER_LAYER
            and "layer" in key
            and isinstance(value, (list, dict))
            and len(value) == n
            and n > 0
        ):
            raise MergeError(
                f"config.json field {field(key)!r} has one entry per layer but mergesmith does not know whether it "
                "describes the layers; it cannot rewrite it for a passthrough that changes the layers"
            )
    for rule in RULES:
        if config.get(rule.fields[0]) is None or any(config.get(u) is not None for u in rule.unless):
            continue
        source_kinds = [rule.kind(config, j, n) for j in range(n)]
        _describe(described, lambda j, k=source_kinds: k[j])
        wanted = [source_kinds[s] for s in source]
        if [rule.kind(config, i, m) for i in range(m)] == wanted:
            continue
        refit = rule.refit(wanted) if rule.refit else None
        if refit is None:
            names = "/".join(field(f) for f in rule.fields)
            raise MergeError(
                f"config.json field {names} places layer kinds by layer number and cannot describe the output's "
                f"layer order (its layers come from source layers {_short(source)}); choose layer ranges that "
                "keep every layer's kind at its position"
            )
        updates.update(refit)
    _check_described(described, kinds, source, where)
    config.update(updates)


def _describe(described: list[list[Any]], value: Callable[[int], Any]) -> None:
    for j, entry in enumerate(described):
        entry.append(value(j))


def _check_described(
    described: list[list[Any]], kinds: Sequence[frozenset[str]], source: Sequence[int], where: str
) -> None:
    """Layers that hold different tensors must differ in some field the rewrite follows; otherwise something
    unknown decides which layer is of which kind, and reordering would break it."""
    seen: dict[str, tuple[int, frozenset[str]]] = {}
    for j, kind in enumerate(kinds):
        said = repr(described[j])
        if said in seen and seen[said][1] != kind:
            first = seen[said][0]
            raise MergeError(
                f"layers {first} and {j} hold different tensors, but no field of config.json{' ' + where.rstrip('.') if where else ''} "
                f"that mergesmith knows says how they differ; it cannot write a config.json for a passthrough that "
                f"reorders or repeats them (source layers {_short(source)})"
            )
        seen.setdefault(said, (j, kind))


def _layer_number(key: Any, field: str) -> int:
    try:
        return int(key)
    except (TypeError, ValueError):
        raise MergeError(
            f"config.json field {field!r} should be keyed by layer number, not {key!r}"
        ) from None


def _short(source: Sequence[int]) -> str:
    shown = ", ".join(str(s) for s in source[:12])
    return f"[{shown}{', ...' if len(source) > 12 else ''}]"
