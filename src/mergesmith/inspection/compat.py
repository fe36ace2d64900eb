"""The compatibility section of ``mergesmith inspect``: what can be told from headers, config.json and the
tokenizer files alone, before any tensor is read (seconds, whatever the size of the models).

Each finding is a :class:`Problem`: one line that names the model and says what to do. ``error`` means the
merge would fail or mean nothing (different architecture or shapes, another vocabulary); ``warning``
means it runs but something differs that the user should know (rope settings, tied embeddings, token ids).
Whether each model really is a fine-tune of the base needs the weights: see :func:`shared_base_verdict`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from mergesmith.core.arch import TEXT_CONFIG_KEYS, Layout, is_embedding, tie_word_embeddings
from mergesmith.core.dtypes import FLOAT_CODES, dtype_name
from mergesmith.core.errors import MergeError
from mergesmith.core.model import ModelSource, read_json_file, regular_file

# A model's distance to the base: the median over its changed weight matrices of ||tau|| / ||base||
# (analyse.base_distance; docs/inspect.md, "Shared base"). Measured: fine-tunes 0.01 (tests' noise
# fine-tunes), 0.051-0.110 (the shipped skill experts), 0.1 (bench/speed.py's fine-tunes); unrelated models
# 1.06 (the skill base against a random initialisation of its config), 1.42 (two random initialisations),
# 3.1 (a skill expert against a random model as its base). Above NOT_FINETUNE the model is not a fine-tune
# of the base; between DISTANT and NOT_FINETUNE it moved far (continued pre-training, a heavy fine-tune),
# and vectors that large rarely merge well.
DISTANT = 0.3
NOT_FINETUNE = 0.7

ROPE_KEYS = ("rope_theta", "rope_scaling", "rope_parameters", "max_position_embeddings", "sliding_window")
SHOWN = 3  # examples named in one line


@dataclass(frozen=True)
class Problem:
    severity: str  # "error" or "warning"
    check: str  # architecture, layers, shapes, vocabulary, tokenizer, tied_embeddings, rope, dtypes, plan,
    # shared_base, non_finite
    model: str | None
    message: str

    def line(self) -> str:
        return f"{self.severity}: {self.message}"

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _shown(items: Sequence[str]) -> str:
    more = f" and {len(items) - SHOWN} more" if len(items) > SHOWN else ""
    return ", ".join(repr(x) for x in items[:SHOWN]) + more


def text_value(config: dict, key: str) -> Any:
    """``key`` of config.json, at the top level or in the language model's sub-config."""
    if key in config:
        return config[key]
    for sub in TEXT_CONFIG_KEYS:
        inner = config.get(sub)
        if isinstance(inner, dict) and key in inner:
            return inner[key]
    return None


def check_headers(base: ModelSource, models: Sequence[ModelSource]) -> list[Problem]:
    """Every difference between each model and the base that headers and config.json show."""
    layouts = [_layout(src) for src in (base, *models)]  # each source's layout, read once
    out: list[Problem] = [p for _, p in layouts if p is not None]
    # the base's side of every comparison, read once for all models
    base_layers, base_vocab = layouts[0][0], _vocab_of(base)
    for m, (m_layers, _) in zip(models, layouts[1:], strict=True):
        out += _architecture(base, m) + _layers(base, m, base_layers, m_layers) + _shapes(base, m)
        out += _vocabulary(base, m, base_vocab)
        out += _tied(base, m) + _rope(base, m)
    out += _dtypes(base, models)
    return out


def _architecture(base: ModelSource, m: ModelSource) -> list[Problem]:
    def kind(cfg: dict) -> str:
        arch = cfg.get("architectures")
        names = "/".join(arch) if isinstance(arch, list) and arch else "?"
        return f"{names} (model_type {cfg.get('model_type', '?')})"

    if kind(base.config) == kind(m.config):
        return []
    return [
        Problem(
            "error",
            "architecture",
            m.ref,
            f"model {m.ref!r} is {kind(m.config)}, the base {base.ref!r} is {kind(base.config)}: tensors of "
            "other architectures mean other things; merge models of the base's architecture",
        )
    ]


def _layout(src: ModelSource) -> tuple[int | None, Problem | None]:
    """``src``'s decoder depth, and an error where config.json gives a layer count its weights do not
    have (merge refuses such a model); None for the depth where the layout cannot be read."""
    try:
        return Layout.infer(src.ref, list(src.tensors), src.config).num_layers, None
    except MergeError as exc:
        return None, Problem("error", "layers", src.ref, str(exc))
    except Exception:  # noqa: BLE001 - a layout that cannot be read shows as a shape difference below
        return None, None


def _layers(base: ModelSource, m: ModelSource, nb: int | None, nm: int | None) -> list[Problem]:
    if nb is None or nm is None or nb == nm:
        return []
    return [
        Problem(
            "error",
            "layers",
            m.ref,
            f"model {m.ref!r} has {nm} layers, the base {base.ref!r} has {nb}: merge models of the same depth "
            "(or pair layers with slices and layer_range)",
        )
    ]


def _shapes(base: ModelSource, m: ModelSource) -> list[Problem]:
    """Tensors missing, extra, or of another shape (the vocabulary-sized ones are _vocabulary's)."""
    bt, mt = base.tensors, m.tensors
    tied_names = {n for n in bt if n.endswith("lm_head.weight")} | {
        n for n in mt if n.endswith("lm_head.weight")
    }
    missing = [n for n in bt if n not in mt and n not in tied_names]
    extra = [n for n in mt if n not in bt and n not in tied_names]
    differ = [
        n
        for n in bt
        if n in mt and bt[n].shape != mt[n].shape and not (is_embedding(n) and _rows_only(bt[n], mt[n]))
    ]
    out = []
    if missing:
        out.append(
            Problem(
                "error",
                "shapes",
                m.ref,
                f"model {m.ref!r} lacks {len(missing)} tensor(s) of the base ({_shown(missing)}): it is another "
                "architecture or a partial checkpoint; merge complete models of one architecture",
            )
        )
    if extra:
        out.append(
            Problem(
                "warning",
                "shapes",
                m.ref,
                f"model {m.ref!r} has {len(extra)} tensor(s) the base lacks ({_shown(extra)}); they are not "
                "inspected, and a merge needs --allow-crimes to copy them",
            )
        )
    if differ:
        n = differ[0]
        out.append(
            Problem(
                "error",
                "shapes",
                m.ref,
                f"model {m.ref!r}: {len(differ)} tensor(s) differ in shape from the base ({_shown(differ)}; "
                f"{n} is {list(mt[n].shape)} against {list(bt[n].shape)}): the models are not the same size; "
                "merge models of the base's size",
            )
        )
    return out


def _rows_only(a, b) -> bool:
    return len(a.shape) == len(b.shape) == 2 and a.shape[1:] == b.shape[1:] and a.shape[0] != b.shape[0]


def _vocabulary(base: ModelSource, m: ModelSource, base_vocab: dict[str, int] | None) -> list[Problem]:
    out = []
    vb, vm = text_value(base.config, "vocab_size"), text_value(m.config, "vocab_size")
    rows = [
        f"{n} has {m.tensors[n].shape[0]} rows, the base {base.tensors[n].shape[0]}"
        for n in base.tensors
        if is_embedding(n) and n in m.tensors and _rows_only(base.tensors[n], m.tensors[n])
    ]
    if vb != vm or rows:
        detail = f"vocab_size {vm} against the base's {vb}" + (f"; {rows[0]}" if rows else "")
        out.append(
            Problem(
                "error",
                "vocabulary",
                m.ref,
                f"model {m.ref!r} has another vocabulary ({detail}): resize its embeddings to the base's "
                "tokenizer, or merge only models that share the base's tokenizer",
            )
        )
    diff = tokenizer_difference(base, m, base_vocab)
    if diff is not None:
        added, missing, moved = diff
        if added or missing or moved:
            parts = []
            if added:
                parts.append(f"{len(added)} token(s) added ({_shown(added)})")
            if missing:
                parts.append(f"{len(missing)} missing ({_shown(missing)})")
            if moved:
                parts.append(f"{len(moved)} moved to other ids ({_shown(moved)})")
            severity = "error" if missing or moved else "warning"
            advice = (
                "rows of the embeddings mean other tokens; align the tokenizers before merging"
                if severity == "error"
                else "the added rows have no counterpart in the base; set tokenizer_source if the output needs them"
            )
            out.append(
                Problem(
                    severity,
                    "tokenizer",
                    m.ref,
                    f"model {m.ref!r}: tokenizer differs from the base's: {', '.join(parts)}: {advice}",
                )
            )
    return out


def _vocab_of(src: ModelSource) -> dict[str, int] | None:
    """token -> id from tokenizer.json (the model's vocabulary and the added tokens), or None."""
    path = src.optional_file("tokenizer.json")
    if path is None or not regular_file(path):
        return None
    try:
        data = read_json_file(path, f"model {src.ref!r}: tokenizer.json")
    except Exception:  # noqa: BLE001 - an unreadable tokenizer is not inspected; merges do not read it
        return None
    if not isinstance(data, dict):
        return None
    vocab: dict[str, int] = {}
    model = data.get("model") if isinstance(data.get("model"), dict) else {}
    raw = model.get("vocab")
    if isinstance(raw, dict):
        vocab.update({str(k): int(v) for k, v in raw.items() if isinstance(v, int)})
    elif isinstance(raw, list):  # Unigram: [[piece, score], ...], the id is the position
        vocab.update({str(p[0]): i for i, p in enumerate(raw) if isinstance(p, list) and p})
    for tok in data.get("added_tokens") or []:
        if isinstance(tok, dict) and isinstance(tok.get("content"), str) and isinstance(tok.get("id"), int):
            vocab[tok["content"]] = tok["id"]
    return vocab or None


def tokenizer_difference(
    base: ModelSource, m: ModelSource, vb: dict[str, int] | None
) -> tuple[list[str], list[str], list[str]] | None:
    """(tokens added, missing, moved to another id) of ``m``'s tokenizer.json against the base's (``vb``,
    the base's :func:`_vocab_of`); None when either has no tokenizer.json."""
    vm = _vocab_of(m)
    if vb is None or vm is None:
        return None
    added = sorted((t for t in vm if t not in vb), key=lambda t: vm[t])
    missing = sorted((t for t in vb if t not in vm), key=lambda t: vb[t])
    moved = sorted((t for t in vb if t in vm and vb[t] != vm[t]), key=lambda t: vb[t])
    return added, missing, moved


def _tied(base: ModelSource, m: ModelSource) -> list[Problem]:
    tb, tm = tie_word_embeddings(base.config), tie_word_embeddings(m.config)
    if tb == tm:
        return []
    return [
        Problem(
            "warning",
            "tied_embeddings",
            m.ref,
            f"model {m.ref!r} has tie_word_embeddings {tm}, the base {tb}: its output head is "
            f"{'its embedding' if tm else 'a separate lm_head'}; the merge follows the base's config",
        )
    ]


def _rope(base: ModelSource, m: ModelSource) -> list[Problem]:
    differ = []
    for key in ROPE_KEYS:
        a, b = text_value(base.config, key), text_value(m.config, key)
        if json.dumps(a, sort_keys=True, default=str) != json.dumps(b, sort_keys=True, default=str):
            differ.append(f"{key} {b} against {a}")
    if not differ:
        return []
    return [
        Problem(
            "warning",
            "rope",
            m.ref,
            f"model {m.ref!r}: position settings differ from the base's ({'; '.join(differ)}): the merged model "
            "takes the base's; check that the fine-tune was trained with them",
        )
    ]


def _dtypes(base: ModelSource, models: Sequence[ModelSource]) -> list[Problem]:
    def codes(src: ModelSource) -> str:
        found = sorted({i.code for i in src.tensors.values() if i.code in FLOAT_CODES})
        return "/".join(dtype_name(c) for c in found) or "none"

    seen = {src.ref: codes(src) for src in (base, *models)}
    if len(set(seen.values())) <= 1:
        return []
    detail = ", ".join(f"{ref!r} {c}" for ref, c in seen.items())
    return [
        Problem(
            "warning",
            "dtypes",
            None,
            f"the models are stored in different dtypes ({detail}): the merge computes in float32 and writes "
            "the config's dtype (or float32); set `dtype:` in the config to choose",
        )
    ]


def shared_base_verdict(ref: str, relative_distance: float) -> tuple[str, Problem | None]:
    """The verdict on one model's relative distance to the base, and the problem it makes (if any)."""
    d = relative_distance
    if d != d:  # NaN: a base of zero norm, or non-finite weights
        return "unknown", Problem(
            "warning", "shared_base", ref, f"model {ref!r}: its distance to the base is not a number"
        )
    if d > NOT_FINETUNE:
        return "not a fine-tune", Problem(
            "error",
            "shared_base",
            ref,
            f"model {ref!r} is not a fine-tune of the base: its weight matrices are {d:.3f} of the base's norm "
            f"away from it (median ||model - base|| / ||base||; over "
            f"{NOT_FINETUNE}; unrelated models give 1 or more): merge fine-tunes of one base model",
        )
    if d > DISTANT:
        return "distant", Problem(
            "warning",
            "shared_base",
            ref,
            f"model {ref!r} moved far from the base: median ||model - base|| / ||base|| of its matrices {d:.3f} "
            f"(fine-tunes give "
            f"0.002-0.1; over {DISTANT} is continued pre-training or another base): expect a weak merge",
        )
    return "fine-tune", None


def verdict_of(problems: Sequence[Problem]) -> str:
    if any(p.severity == "error" for p in problems):
        return "incompatible"
    if problems:
        return "compatible, with warnings"
    return "compatible"
