"""GGUF tokenizer metadata that makes llama.cpp tokenize text exactly as transformers does.

A Hugging Face ``tokenizer.json`` is read as data and mapped onto one of llama.cpp's tokenizer
models, or refused (``tokenizer.ggml.model = "none"``, token ids only) with a one-line note:

* **Byte-level BPE** (GPT-2, Llama-3, Qwen2 style) -> ``gpt2`` with merges and a
  ``tokenizer.ggml.pre`` name. llama.cpp splits words with a fixed regex per pre-tokenizer name, so
  the name is found by comparing the tokenizer's pre-tokenizer (its ``Split`` regex, ``Digits`` and
  ``ByteLevel`` steps) with the regexes llama.cpp uses for each name (``KNOWN_PRETOKENIZERS``), and by
  checking the flags the name implies (``ignore_merges``). Anything else is refused.
* **SentencePiece-style BPE** (Llama-2 / Mistral: ``Metaspace`` or ``Prepend``+``Replace`` with
  ``byte_fallback``) -> ``llama``. llama.cpp's SentencePiece tokenizer merges, among the adjacent
  pairs whose concatenation is a token, the one whose token has the highest score. Giving each token
  the score ``-rank`` of the first merge that builds it reproduces BPE exactly when every split of a
  token into two tokens is itself a merge and the merges of one token are consecutive; that holds for
  vocabularies converted from SentencePiece (the Llama-2 family). When it does not, the note says so.
* ``tokenizer.ggml.add_bos_token`` / ``add_eos_token`` follow the post-processor (transformers
  applies its template), else ``add_bos_token``/``add_eos_token`` of ``tokenizer_config.json``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

SPM_SPACE = "\u2581"  # "▁", SentencePiece's visible space
BYTE_TOKEN = re.compile(r"<0x[0-9A-F]{2}>")  # llama.cpp looks byte tokens up as "<0x%02X>"

# Pre-tokenizer regexes as they appear in tokenizer.json files (the published patterns of each
# family); llama.cpp applies an equivalent regex for the matching ``tokenizer.ggml.pre`` name.
GPT2_REGEX = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)


@dataclass(frozen=True)
class PreTokenizer:
    """One llama.cpp pre-tokenizer: its name, the tokenizer.json steps it stands for (canonical
    form, see :func:`_pre_steps`), and whether llama.cpp takes a word that is a whole token as that
    token without merging (``ignore_merges``, which the BPE model must then also set)."""

    name: str
    steps: tuple[tuple[str, str], ...]
    ignore_merges: bool = False


KNOWN_PRETOKENIZERS = (
    PreTokenizer("gpt-2", (("split", GPT2_REGEX),)),
    PreTokenizer("llama-bpe", (("split", LLAMA3_REGEX),), ignore_merges=True),
    PreTokenizer("qwen2", (("split", QWEN2_REGEX),)),
    PreTokenizer("starcoder", (("digits", "individual"), ("split", GPT2_REGEX))),
)


class Refused(ValueError):
    """The tokenizer cannot be written so that llama.cpp tokenizes as transformers does."""


def _vt() -> Any:
    import gguf

    return gguf.GGUFValueType


def _token_type() -> Any:
    import gguf

    return gguf.TokenType


def tokenizer_metadata(
    tokenizer_json: Mapping[str, Any] | None,
    tokenizer_config: Mapping[str, Any] | None,
    vocab_size: int,
    model_config: Mapping[str, Any] | None = None,
) -> tuple[list[tuple[str, Any, Any]], str | None]:
    """``(metadata, note)``: the ``tokenizer.ggml.*`` key/values (``(key, value, GGUFValueType)``)
    for ``tokenizer.json``, and one line for the user (why no vocabulary was written, or what llama.cpp
    will not reproduce), or None. ``model_config`` (config.json) supplies bos/eos ids that
    ``tokenizer_config.json`` does not name."""
    vt = _vt()
    none = [("tokenizer.ggml.model", "none", vt.STRING)]
    if not tokenizer_json:
        return none, "no tokenizer.json: GGUF written without a vocabulary (token ids only)"
    try:
        return _metadata(tokenizer_json, tokenizer_config or {}, vocab_size, model_config or {})
    except Refused as exc:
        return none, f"{exc}: GGUF written without a vocabulary (token ids only)"


def _metadata(
    tj: Mapping[str, Any], tc: Mapping[str, Any], vocab_size: int, mc: Mapping[str, Any]
) -> tuple[list[tuple[str, Any, Any]], str | None]:
    model = tj.get("model") or {}
    kind = model.get("type")
    if kind == "WordLevel" and isinstance(model.get("vocab"), Mapping):
        try:
            steps = _pre_steps(tj.get("pre_tokenizer"))
        except Refused:
            steps = []  # refused just below, with the WordLevel message
        body, note = _char_level(tj, model, steps, vocab_size)
        return body + _special_ids(tj, tc, mc, model["vocab"], vocab_size), note
    if kind != "BPE" or not isinstance(model.get("vocab"), Mapping):
        raise Refused(
            f"tokenizer model {kind!r} has no llama.cpp equivalent here (BPE, or character-level WordLevel)"
        )
    for option in ("dropout", "continuing_subword_prefix", "end_of_word_suffix"):
        if model.get(option):
            raise Refused(f"BPE option {option}={model[option]!r} is not supported by llama.cpp")
    steps = _pre_steps(tj.get("pre_tokenizer"))
    if any(kind == "bytelevel" for kind, _ in steps):
        body, note = _gpt2(tj, model, steps, vocab_size)
    elif model.get("byte_fallback"):
        body, note = _llama(tj, model, steps, vocab_size)
    else:
        raise Refused("BPE tokenizer is neither byte-level nor SentencePiece-style with byte_fallback")
    return body + _special_ids(tj, tc, mc, model["vocab"], vocab_size), note


# --------------------------------------------------------------------------- pre-tokenizers


def _regex(pattern: Any) -> str:
    if isinstance(pattern, Mapping):
        if "Regex" in pattern:
            return str(pattern["Regex"])
        if "String" in pattern:
            return re.escape(str(pattern["String"]))
    raise Refused(f"pre-tokenizer pattern {pattern!r} is not understood")


def _pre_steps(pre: Any) -> list[tuple[str, str]]:
    """The pre-tokenizer as a list of canonical steps: ``("split", regex)`` (an isolating regex
    split; a regex ByteLevel is the GPT-2 regex split followed by a plain ByteLevel),
    ``("bytelevel", "")``, ``("digits", "individual")``, ``("metaspace", options)``."""
    if pre is None:
        return []
    kind = pre.get("type")
    if kind == "Sequence":
        return [step for item in pre.get("pretokenizers") or [] for step in _pre_steps(item)]
    if kind == "ByteLevel":
        if pre.get("add_prefix_space"):
            raise Refused("ByteLevel add_prefix_space=true has no llama.cpp equivalent")
        split = [("split", GPT2_REGEX)] if pre.get("use_regex", True) else []
        return [*split, ("bytelevel", "")]
    if kind == "Split":
        if pre.get("behavior") != "Isolated" or pre.get("invert"):
            raise Refused(f"Split pre-tokenizer with behavior {pre.get('behavior')!r} is not supported")
        return [("split", _regex(pre.get("pattern")))]
    if kind == "Digits" and pre.get("individual_digits"):
        return [("digits", "individual")]
    if kind == "Metaspace":
        if pre.get("replacement", SPM_SPACE) != SPM_SPACE:
            raise Refused(f"Metaspace replacement {pre.get('replacement')!r} is not {SPM_SPACE!r}")
        scheme = pre.get("prepend_scheme")
        if scheme is None:  # tokenizers < 0.14 wrote a boolean
            scheme = "always" if pre.get("add_prefix_space", True) else "never"
        return [("metaspace", f"{scheme}:{'split' if pre.get('split', True) else 'whole'}")]
    raise Refused(f"pre-tokenizer {kind!r} has no llama.cpp equivalent")


def pre_tokenizer_name(steps: Sequence[tuple[str, str]], ignore_merges: bool) -> str:
    """llama.cpp's ``tokenizer.ggml.pre`` for a byte-level pre-tokenizer; :class:`Refused` when
    llama.cpp has no name that splits words the same way."""
    words = tuple(step for step in steps if step[0] != "bytelevel")
    if steps and steps[-1][0] != "bytelevel":
        raise Refused("ByteLevel must be the last pre-tokenizer step")
    for known in KNOWN_PRETOKENIZERS:
        if known.steps == words:
            if known.ignore_merges != ignore_merges:
                raise Refused(
                    f"pre-tokenizer matches llama.cpp's {known.name!r}, which sets ignore_merges="
                    f"{known.ignore_merges}, but the BPE model has ignore_merges={ignore_merges}"
                )
            return known.name
    shown = ", ".join(f"{kind}({arg[:40]})" for kind, arg in words) or "none"
    raise Refused(f"byte-level pre-tokenizer [{shown}] matches no llama.cpp pre-tokenizer")


# --------------------------------------------------------------------------- vocabulary


def _tokens(tj: Mapping[str, Any], vocab: Mapping[str, int], vocab_size: int) -> tuple[list[str], list[int]]:
    """Token texts and types for ids 0..vocab_size-1 (ids with no token: ``[PADn]``, UNUSED)."""
    tt = _token_type()
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    types = [int(tt.UNUSED)] * vocab_size
    for piece, idx in vocab.items():
        if 0 <= idx < vocab_size:
            tokens[idx], types[idx] = piece, int(tt.NORMAL)
    for added in tj.get("added_tokens") or []:
        idx = added.get("id", -1)
        if 0 <= idx < vocab_size:
            tokens[idx] = added["content"]
            types[idx] = int(tt.CONTROL if added.get("special") else tt.USER_DEFINED)
    seen: dict[str, int] = {}
    for idx, text in enumerate(tokens):
        if text in seen:  # llama.cpp maps text -> id and refuses a vocabulary with duplicates
            raise Refused(f"token {text!r} has two ids ({seen[text]} and {idx})")
        seen[text] = idx
    return tokens, types


def _merge_pairs(model: Mapping[str, Any]) -> list[tuple[str, str]]:
    pairs = []
    for m in model.get("merges") or []:
        parts = m.split(" ", 1) if isinstance(m, str) else list(m)
        if len(parts) != 2:
            raise Refused(f"BPE merge {m!r} is not a pair")
        pairs.append((parts[0], parts[1]))
    return pairs


def _gpt2(
    tj: Mapping[str, Any], model: Mapping[str, Any], steps: list[tuple[str, str]], vocab_size: int
) -> tuple[list[tuple[str, Any, Any]], str | None]:
    vt = _vt()
    pre = pre_tokenizer_name(steps, bool(model.get("ignore_merges")))
    note = None
    normalizer = (tj.get("normalizer") or {}).get("type")
    if normalizer == "NFC":
        note = "llama.cpp does not apply the NFC normalizer: text not already in NFC may tokenize differently"
    elif normalizer is not None:
        raise Refused(f"normalizer {normalizer!r} is not applied by llama.cpp")
    tokens, types = _tokens(tj, model["vocab"], vocab_size)
    # llama.cpp splits a merge line at its first space after the first character; a space inside a
    # piece is written as its byte-level form (U+0120, what " " becomes in byte-level text).
    merges = [" ".join(p.replace(" ", "\u0120") for p in pair) for pair in _merge_pairs(model)]
    return [
        ("tokenizer.ggml.model", "gpt2", vt.STRING),
        ("tokenizer.ggml.pre", pre, vt.STRING),
        ("tokenizer.ggml.tokens", tokens, vt.ARRAY),
        ("tokenizer.ggml.token_type", types, vt.ARRAY),
        ("tokenizer.ggml.merges", merges, vt.ARRAY),
    ], note


def byte_level_alphabet() -> dict[int, str]:
    """GPT-2's byte -> character table of byte-level BPE: printable Latin-1 bytes stand for
    themselves, the others (space, control bytes...) for the characters from U+0100 on, in order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    table = {b: chr(b) for b in printable}
    extra = (b for b in range(256) if b not in table)
    for n, b in enumerate(extra):
        table[b] = chr(256 + n)
    return table


def _char_level(
    tj: Mapping[str, Any], model: Mapping[str, Any], steps: list[tuple[str, str]], vocab_size: int
) -> tuple[list[tuple[str, Any, Any]], str | None]:
    """A character-level WordLevel tokenizer (``Split(".")``, one character per token) as a byte-level
    BPE with no merges but those that rebuild each multi-byte character from its UTF-8 bytes: llama.cpp
    then finds every character's token as transformers does."""
    vt = _vt()
    if steps != [("split", ".")] or tj.get("normalizer"):
        raise Refused(
            "WordLevel is exported only for a character-level tokenizer (Split on '.', no normalizer)"
        )
    added = {a.get("content") for a in tj.get("added_tokens") or []}
    alphabet = byte_level_alphabet()
    vocab: dict[str, int] = {}
    merges: list[str] = []
    for piece, idx in model["vocab"].items():
        if piece in added:
            vocab[piece] = idx
            continue
        if len(piece) != 1:
            raise Refused(f"WordLevel token {piece!r} is not one character")
        chars = [alphabet[b] for b in piece.encode()]
        merges += [f"{''.join(chars[:n])} {chars[n]}" for n in range(1, len(chars))]
        vocab["".join(chars)] = idx
    # llama.cpp needs a merges array and gguf cannot write an empty one: "▁ ▁" never applies, as "▁"
    # (U+2581) is not a character of byte-level text.
    merges = merges or [f"{SPM_SPACE} {SPM_SPACE}"]
    tokens, types = _tokens(tj, vocab, vocab_size)
    note = (
        "character-level tokenizer written as byte-level BPE: llama.cpp drops characters that are not "
        f"in the vocabulary, where transformers gives {model.get('unk_token')!r}"
    )
    return [
        ("tokenizer.ggml.model", "gpt2", vt.STRING),
        ("tokenizer.ggml.pre", "gpt-2", vt.STRING),
        ("tokenizer.ggml.tokens", tokens, vt.ARRAY),
        ("tokenizer.ggml.token_type", types, vt.ARRAY),
        ("tokenizer.ggml.merges", merges, vt.ARRAY),
    ], note


def _spm_layout(tj: Mapping[str, Any], steps: list[tuple[str, str]]) -> tuple[bool, bool]:
    """``(add_space_prefix, split_words)`` of a SentencePiece-style tokenizer: either a Metaspace
    pre-tokenizer, or a ``Prepend("▁")`` + ``Replace(" ", "▁")`` normalizer (transformers' newer
    Llama form) with no pre-tokenizer; :class:`Refused` otherwise."""
    normalizer = tj.get("normalizer")
    parts = (
        (normalizer.get("normalizers") or []) if normalizer and normalizer.get("type") == "Sequence" else []
    )
    parts = parts or ([normalizer] if normalizer else [])
    prepend = replace = False
    for part in parts:
        if part.get("type") == "Prepend" and part.get("prepend") == SPM_SPACE and not replace:
            prepend = True
        elif (
            part.get("type") == "Replace"
            and part.get("pattern") == {"String": " "}
            and part.get("content") == SPM_SPACE
        ):
            replace = True
        else:
            raise Refused(f"normalizer {part.get('type')!r} is not applied by llama.cpp")
    if steps == [] and replace:
        return prepend, False
    if len(steps) == 1 and steps[0][0] == "metaspace" and not prepend:
        scheme, split = steps[0][1].split(":")
        return scheme != "never", split == "split"
    raise Refused("BPE with byte_fallback needs a Metaspace pre-tokenizer or a Prepend/Replace normalizer")


def spm_scores(
    tokens: Sequence[str], types: Sequence[int], merges: Sequence[tuple[str, str]], split_words: bool
) -> tuple[list[float], str | None]:
    """Scores for llama.cpp's SentencePiece tokenizer (``-rank`` of the first merge building each
    token; tokens no merge builds get a score below all of those) and a note when that tokenizer may
    split some words differently from BPE (see the module docstring)."""
    normal, byte = int(_token_type().NORMAL), int(_token_type().BYTE)
    ids = {t: i for i, t in enumerate(tokens)}
    # Single characters and byte tokens are never built by a merge; every other token that no merge
    # builds (specials included) scores below all merges, so llama.cpp builds it last if at all.
    floor = -float(len(merges) + 1)
    scores = [0.0 if len(t) == 1 or types[i] == byte else floor for i, t in enumerate(tokens)]
    merge_set = set(merges)
    seen: set[str] = set()
    previous, consecutive = None, True
    for rank, (left, right) in enumerate(merges):
        built = left + right
        consecutive = consecutive and (built == previous or built not in seen)
        seen.add(built)
        previous = built
        idx = ids.get(built)
        if idx is not None and types[idx] == normal and scores[idx] == floor:
            scores[idx] = -float(rank)
    missing = 0
    for i, text in enumerate(tokens):
        if types[i] != normal or len(text) < 2:
            continue
        if split_words and SPM_SPACE in text[1:]:
            return scores, (
                f"token {text!r} spans a word boundary that Metaspace(split=true) never crosses; "
                "llama.cpp may merge across words"
            )
        for cut in range(1, len(text)):
            left, right = text[:cut], text[cut:]
            if left in ids and right in ids and (left, right) not in merge_set:
                missing += 1
    if missing or not consecutive:
        why = (
            f"{missing} token splits are not merges" if missing else "merges of one token are not consecutive"
        )
        return scores, f"llama.cpp's SentencePiece tokenizer may split some words differently ({why})"
    return scores, None


def _llama(
    tj: Mapping[str, Any], model: Mapping[str, Any], steps: list[tuple[str, str]], vocab_size: int
) -> tuple[list[tuple[str, Any, Any]], str | None]:
    vt = _vt()
    tt = _token_type()
    add_space_prefix, split_words = _spm_layout(tj, steps)
    tokens, types = _tokens(tj, model["vocab"], vocab_size)
    for i, text in enumerate(tokens):  # byte tokens are BYTE even when listed as added tokens
        if types[i] != int(tt.UNUSED) and BYTE_TOKEN.fullmatch(text):
            types[i] = int(tt.BYTE)
    scores, note = spm_scores(tokens, types, _merge_pairs(model), split_words)
    if add_space_prefix and steps:  # Metaspace skips its "▁" when the text already starts with one
        prefix = "texts that begin with a space get one more leading '▁' in llama.cpp than in transformers"
        note = f"{note}; {prefix}" if note else prefix
    return [
        ("tokenizer.ggml.model", "llama", vt.STRING),
        ("tokenizer.ggml.pre", "default", vt.STRING),
        ("tokenizer.ggml.tokens", tokens, vt.ARRAY),
        ("tokenizer.ggml.scores", scores, vt.ARRAY),
        ("tokenizer.ggml.token_type", types, vt.ARRAY),
        ("tokenizer.ggml.add_space_prefix", add_space_prefix, vt.BOOL),
    ], note


# --------------------------------------------------------------------------- special tokens


def _content(tok: Any) -> str | None:
    if isinstance(tok, Mapping):
        tok = tok.get("content")
    return tok if isinstance(tok, str) else None


def _template_ends(post: Any) -> tuple[str | None, str | None] | None:
    """The special tokens the post-processor puts before and after a single sequence
    (``(first, last)``), or None when there is no template (no post-processor, or one that adds none)."""
    if not isinstance(post, Mapping):
        return None
    kind = post.get("type")
    if kind == "Sequence":
        found = [_template_ends(p) for p in post.get("processors") or []]
        found = [f for f in found if f is not None]
        return found[-1] if found else None
    if kind == "TemplateProcessing":
        single = post.get("single") or []
        ends = []
        for item in (single[0], single[-1]) if single else ():
            ends.append(item.get("SpecialToken", {}).get("id") if isinstance(item, Mapping) else None)
        return (ends[0], ends[1]) if len(single) > 1 else (None, None)
    if kind in ("RobertaProcessing", "BertProcessing"):
        return post.get("cls", [None])[0], post.get("sep", [None])[0]
    return None


def _special_ids(
    tj: Mapping[str, Any],
    tc: Mapping[str, Any],
    mc: Mapping[str, Any],
    vocab: Mapping[str, int],
    vocab_size: int,
) -> list[tuple[str, Any, Any]]:
    vt = _vt()
    ids = {a["content"]: a["id"] for a in tj.get("added_tokens") or [] if "content" in a and "id" in a}
    ids = {**vocab, **ids}
    names = {role: _content(tc.get(f"{role}_token")) for role in ("bos", "eos", "unk", "pad")}
    ends = _template_ends(tj.get("post_processor"))
    if ends is None:  # no template: transformers' slow-style flags, as tokenizer_config.json gives them
        add_bos, add_eos = bool(tc.get("add_bos_token", False)), bool(tc.get("add_eos_token", False))
    else:
        first, last = ends
        add_bos, add_eos = first is not None, last is not None
        if first is not None:  # llama.cpp prepends bos_token_id: it must be the template's token
            names["bos"] = first
        if last is not None and names["eos"] not in (None, last):
            raise Refused(
                f"the post-processor appends {last!r}, not the eos token {names['eos']!r}; llama.cpp "
                "can only append the eos token"
            )
        if last is not None:
            names["eos"] = last
    kv: list[tuple[str, Any, Any]] = []
    for role, name in names.items():
        idx = ids.get(name) if name is not None else None
        if idx is None and role in ("bos", "eos") and isinstance(mc.get(f"{role}_token_id"), int):
            idx = mc[f"{role}_token_id"]
        if idx is not None and 0 <= idx < vocab_size:
            kv.append((f"tokenizer.ggml.{role}_token_id", int(idx), vt.UINT32))
        elif (role == "bos" and add_bos) or (role == "eos" and add_eos):
            raise Refused(f"the tokenizer adds a {role} token that is not in the vocabulary")
    kv.append(("tokenizer.ggml.add_bos_token", add_bos, vt.BOOL))
    kv.append(("tokenizer.ggml.add_eos_token", add_eos, vt.BOOL))
    return kv
