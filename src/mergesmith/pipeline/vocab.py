"""The merge's output vocabulary (``tokenizer_source`` / ``tokenizer:``): which tokenizer the output
takes, and each model's vocabulary rows re-indexed to it before any method runs (core/vocab.py)."""

from __future__ import annotations

from typing import Any

import numpy as np

from mergesmith.core.errors import ConfigError, MergeError
from mergesmith.core.model import ModelSource
from mergesmith.core.vocab import (
    TokenizerInfo,
    TokenRule,
    VocabPlan,
    check_rows,
    read_tokenizer,
    row_map,
    union_tokenizer,
    vocab_tensors,
)
from mergesmith.pipeline.config import MergeConfig, ModelTokenSource, TokenEmbedding

SPECIAL_ID_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id")


def token_refs(config: MergeConfig) -> list[str]:
    """Models named by per-token sources (they are read for those rows)."""
    tc = config.tokenizer
    out = []
    for emb in (tc.tokens or {}).values() if tc else ():
        src = emb.source
        if isinstance(src, str):
            out.append(src)
        elif isinstance(src, ModelTokenSource):
            out.append(src.model)
    return out


def plan_vocab(
    config: MergeConfig, inputs: list[str], models: dict[str, ModelSource], config_model: str
) -> VocabPlan | None:
    """The output vocabulary and every input's row map, or None when the rows stay as they are (no
    tokenizer asked for, or one whose vocabulary every model already has in the same order)."""
    tc = config.tokenizer
    if config.tokenizer_source is None and tc is None:
        return None
    choice = config.tokenizer_choice
    src_ref = config_model if choice in ("base", "union") else choice
    required = choice == "union" or (tc is not None and bool(tc.tokens or tc.pad_to_multiple_of))
    why = f"tokenizer_source {choice}" if choice in ("base", "union") else "a tokenizer source"
    refs = list(dict.fromkeys([src_ref, *inputs]))
    if not required and any(models[r].tokenizer_text() is None for r in refs):
        return None  # the tokenizer files are copied as they are; shapes are checked as before
    toks = {r: read_tokenizer(models[r], why) for r in refs}
    extra = [r for r in token_refs(config) if r not in toks]
    for r in extra:
        toks[r] = read_tokenizer(models[r], "a per-token source")
    for r in inputs:
        check_rows(models[r], toks[r])
    base_tok = toks[src_ref]
    union = None
    if choice == "union":
        union = union_tokenizer(base_tok, [toks[r] for r in inputs if r != src_ref])
        vocab = union.vocab
        if not union.new_real and not union.new_added:
            union = None
    else:
        vocab = base_tok.vocab
    n = max(vocab.values(), default=-1) + 1
    rows = n
    if union is None and _has_rows(models[src_ref]):
        rows = max(n, vocab_tensors(models[src_ref])[1])  # the source's own padding rows stay
    pad = tc.pad_to_multiple_of if tc else None
    if pad:
        rows = -(-rows // pad) * pad
    rules = _rules(tc.tokens if tc else None, vocab, toks, inputs)
    forced = {t for t, r in rules.items() if r.force}
    maps = {}
    for r in inputs:
        m = row_map(vocab, toks[r].vocab, rows, forced)
        tok_size, own_rows = toks[r].size, vocab_tensors(models[r])[1]
        for o in range(n, rows):  # padding rows: the model's own padding row where it has one there
            if tok_size <= o < own_rows:
                m[o] = o
        maps[r] = m
    if (
        union is None
        and not forced
        and all(
            vocab_tensors(models[r])[1] == rows and np.array_equal(m, np.arange(rows))
            for r, m in maps.items()
        )
    ):
        return None
    base = config.base_model if config.base_model in inputs else None
    order = list(dict.fromkeys([*([base] if base else []), *inputs]))
    if src_ref not in order and _has_rows(models[src_ref]):
        order.append(src_ref)
    return VocabPlan(
        vocab=dict(vocab),
        rows=rows,
        maps=maps,
        vocabs={r: t.vocab for r, t in toks.items()},
        sizes={r: t.size for r, t in toks.items()},
        order=order,
        rules=rules,
        init=tc.default_init if tc else "omp",
        k=tc.omp_k if tc else 64,
        base=base,
        union=union,
        tokenizers={r: t.data for r, t in toks.items()},
        out_tokenizer=union.data if union is not None else base_tok.data,
    )


def _has_rows(model: ModelSource) -> bool:
    try:
        vocab_tensors(model)
        return True
    except MergeError:
        return False


def _rules(
    tokens: dict[str, TokenEmbedding] | None,
    vocab: dict[str, int],
    toks: dict[str, TokenizerInfo],
    inputs: list[str],
) -> dict[str, TokenRule]:
    out = {}
    for tok, emb in (tokens or {}).items():
        where = f"tokenizer.tokens.{tok!r}"
        if tok not in vocab:
            raise ConfigError(
                f"{where}: the token is not in the output vocabulary (no model's tokenizer has it); "
                "list tokens that a model's tokenizer has"
            )
        src = emb.source
        if src is None:
            if emb.force:
                raise ConfigError(
                    f"{where}: 'force' needs a 'source' (a model, or kind: zero / mean / model_token)"
                )
            continue
        if isinstance(src, str):
            if src not in toks or tok not in toks[src].vocab:
                raise ConfigError(
                    f"{where}: source model {src!r} has no token {tok!r}; name a model that has it, or use "
                    "kind: model_token with a token it has"
                )
            out[tok] = TokenRule("model", model=src, force=emb.force)
        elif isinstance(src, ModelTokenSource):
            known = toks[src.model]
            if src.token is not None and src.token not in known.vocab:
                raise ConfigError(f"{where}: model {src.model!r} has no token {src.token!r}")
            if src.token_id is not None and not 0 <= src.token_id < known.size:
                raise ConfigError(
                    f"{where}: token_id {src.token_id} is outside model {src.model!r}'s vocabulary"
                )
            out[tok] = TokenRule("model_token", src.model, src.token, src.token_id, emb.force)
        else:
            out[tok] = TokenRule(src.kind, force=emb.force)
    return out


def rewrite_token_ids(cfg: dict[str, Any], old: dict[str, int], new: dict[str, int]) -> None:
    """config.json's (or generation_config.json's) special token ids, from ``old``'s ids to ``new``'s,
    by token (also in text_config); an id whose token the new vocabulary lacks is left as it is."""
    inverse = {i: t for t, i in old.items()}

    def fix(v: Any) -> Any:
        if isinstance(v, int) and not isinstance(v, bool) and v in inverse and inverse[v] in new:
            return new[inverse[v]]
        if isinstance(v, list):
            return [fix(x) for x in v]
        return v

    for d in (cfg, cfg.get("text_config")):
        if isinstance(d, dict):
            for key in SPECIAL_ID_KEYS:
                if key in d:
                    d[key] = fix(d[key])


def set_vocab_size(cfg: dict[str, Any], rows: int) -> None:
    text = cfg.get("text_config")
    if "vocab_size" in cfg or not isinstance(text, dict):
        cfg["vocab_size"] = rows
    if isinstance(text, dict) and "vocab_size" in text:
        text["vocab_size"] = rows
