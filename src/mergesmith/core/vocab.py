"""Models with different tokenizers: their vocabularies, an output vocabulary, and each model's
vocabulary-indexed rows (embedding, lm_head) read in the output vocabulary's order.

- :func:`read_tokenizer` reads a model's tokenizer.json (with the ``tokenizers`` library, so a file it
  cannot load fails here, with the model named).
- :func:`union_tokenizer` builds the union tokenizer: the base's tokenizer.json with every other model's
  missing tokens appended (new ids after the base's), as real vocabulary where the tokenizer model allows
  it (BPE: a vocabulary entry and a merge; WordLevel, WordPiece: a vocabulary entry; Unigram: a piece) and
  as added tokens where it does not. Text that contains none of the new tokens' strings is split exactly
  as the base split it, with the same ids.
- :class:`VocabPlan` holds, per model, the map from output rows to the model's own rows (or ``-1``: a
  row it lacks), and :class:`RemappedSource` is a model source whose vocabulary tensors have the output
  vocabulary's rows: a row span is gathered from the model's rows as it is read (no whole-vocabulary
  copy), and rows the model lacks come from :class:`Filler` (computed once per model and tensor).
"""

from __future__ import annotations

import copy
import json
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import TYPE_CHECKING, Any

import numpy as np

from mergesmith.core._torch import torch
from mergesmith.core.arch import is_embedding, tie_word_embeddings
from mergesmith.core.errors import MergeError
from mergesmith.core.model import ModelSource, TensorInfo
from mergesmith.core.omp import DEFAULT_K, omp

if TYPE_CHECKING:
    import torch as _t

OMP_BATCH = 256  # tokens solved together by OMP
GATHER_GAP = 32  # rows read in one pread when the needed rows are this close (fewer, larger reads)
REAL_VOCAB_KINDS = ("BPE", "WordLevel", "WordPiece", "Unigram")


# --- tokenizers ---------------------------------------------------------------------------------------


@dataclass
class TokenizerInfo:
    ref: str
    data: dict  # tokenizer.json
    vocab: dict[str, int]  # every token (model vocabulary and added tokens) -> id
    added: dict[str, dict]  # added tokens: content -> its entry in tokenizer.json
    kind: str  # the tokenizer model's type: BPE, WordLevel, WordPiece, Unigram

    @property
    def size(self) -> int:
        return max(self.vocab.values(), default=-1) + 1

    @cached_property
    def tokenizer(self) -> Any:
        """The ``tokenizers.Tokenizer`` of ``data``."""
        from tokenizers import Tokenizer

        return Tokenizer.from_str(json.dumps(self.data))


def read_tokenizer(model: ModelSource, why: str) -> TokenizerInfo:
    """``model``'s tokenizer.json, read (and checked loadable) with the ``tokenizers`` library."""
    from tokenizers import Tokenizer

    text = model.tokenizer_text()
    if text is None:
        raise MergeError(
            f"model {model.ref!r} has no tokenizer.json, which {why} needs; save its tokenizer as a fast "
            "tokenizer (AutoTokenizer.from_pretrained(...).save_pretrained(folder))"
        )
    try:
        tok = Tokenizer.from_str(text)
        data = json.loads(text)
    except Exception as e:  # the library's errors are plain Exceptions with a message
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise MergeError(
            f"model {model.ref!r}: tokenizer.json cannot be read ({first}); replace it with a tokenizer "
            "saved by transformers or tokenizers"
        ) from None
    added = {a["content"]: a for a in data.get("added_tokens") or []}
    kind = str((data.get("model") or {}).get("type") or "?")
    return TokenizerInfo(model.ref, data, tok.get_vocab(with_added_tokens=True), added, kind)


@dataclass
class UnionTokenizer:
    data: dict  # the tokenizer.json to write
    vocab: dict[str, int]  # token (as the models spell it) -> output id
    new_real: list[str] = field(default_factory=list)  # new tokens that are real vocabulary
    new_added: list[dict] = field(default_factory=list)  # new tokens that are added tokens (entries)
    # an added token made from a vocabulary entry is matched as text: its content is the entry decoded
    # ('Ġhello' -> ' hello'); the row maps keep the vocabulary spelling
    spelled: dict[str, str] = field(default_factory=dict)


def union_tokenizer(base: TokenizerInfo, others: Sequence[TokenizerInfo]) -> UnionTokenizer:
    """The base's tokenizer with every token of ``others`` that it lacks, appended in the order the
    models are given (each model's tokens in id order)."""
    for o in others:
        if o.kind != base.kind:
            raise MergeError(
                f"tokenizer_source union needs tokenizers of one kind: base {base.ref!r} is {base.kind}, "
                f"{o.ref!r} is {o.kind}; use tokenizer_source: base (or one model's tokenizer)"
            )
    data = copy.deepcopy(base.data)
    vocab = dict(base.vocab)
    next_id = base.size
    pending: list[tuple[str, TokenizerInfo]] = []
    for o in others:
        for tok, _ in sorted(o.vocab.items(), key=lambda kv: kv[1]):
            if tok not in vocab:
                vocab[tok] = next_id
                next_id += 1
                pending.append((tok, o))
    out = UnionTokenizer(data, vocab)
    if not pending:
        return out
    model = data["model"]
    kind = base.kind
    real: dict[str, TokenizerInfo] = {}
    for tok, o in pending:
        if tok in o.added or kind not in REAL_VOCAB_KINDS:
            _add_token(out, tok, vocab[tok], o)
        else:
            real[tok] = o
    if kind in ("WordLevel", "WordPiece"):
        for tok in real:
            model["vocab"][tok] = vocab[tok]
            out.new_real.append(tok)
    elif kind == "Unigram":
        pieces = model["vocab"]
        low = min((p[1] for p in pieces), default=0.0)
        for tok, o in real.items():
            if vocab[tok] != len(pieces):  # ids of a Unigram model are positions: only contiguous ones fit
                _add_token(out, tok, vocab[tok], o)
                continue
            score = dict((p[0], p[1]) for p in o.data["model"]["vocab"]).get(tok, low)
            pieces.append([tok, score])
            out.new_real.append(tok)
    else:
        _bpe_union(out, model, real)
    _check_union(out, base)
    return out


def _add_token(out: UnionTokenizer, tok: str, new_id: int, src: TokenizerInfo) -> None:
    entry = dict(src.added.get(tok) or {"single_word": False, "lstrip": False, "rstrip": False})
    entry.setdefault("normalized", tok not in src.added)
    entry.setdefault("special", False)
    content = tok if tok in src.added else _decoded(src, tok)
    if content != tok:
        out.spelled[tok] = content
    entry.update(id=new_id, content=content)
    out.data.setdefault("added_tokens", []).append(entry)
    out.new_added.append(entry)


def _decoded(src: TokenizerInfo, tok: str) -> str:
    """The text a vocabulary entry stands for (its tokenizer's decoder), or the entry if it decodes to
    nothing."""
    try:
        text = src.tokenizer.decode([src.vocab[tok]], skip_special_tokens=False)
    except Exception:  # a decoder the library cannot run on one token: keep the spelling
        return tok
    return text or tok


def _bpe_union(out: UnionTokenizer, model: dict, real: dict[str, TokenizerInfo]) -> None:
    """New BPE tokens as vocabulary entries reached by a merge appended after the base's merges (the
    merge the token's own model has, else any split into two known tokens); one-character tokens need no
    merge. A merge appended last fires only on text that contains the new token's string, so other text is
    split as before. A token no merge can reach becomes an added token."""
    merges = model.setdefault("merges", [])
    as_pairs = not merges or not isinstance(merges[0], str)
    known = set(model["vocab"])
    pairs: dict[str, dict[str, tuple[str, str]]] = {}
    for o in {id(o): o for o in real.values()}.values():
        m: dict[str, tuple[str, str]] = {}
        for mg in o.data["model"].get("merges") or []:
            a, b = mg if not isinstance(mg, str) else mg.split(" ", 1)
            m.setdefault(a + b, (a, b))
        pairs[o.ref] = m
    remaining = list(real)
    while remaining:
        left = []
        for tok in remaining:
            split = None if len(tok) == 1 else _split(tok, pairs[real[tok].ref].get(tok), known)
            if len(tok) > 1 and split is None:
                left.append(tok)
                continue
            if split is not None:
                if not as_pairs and (" " in split[0] or " " in split[1]):
                    left.append(tok)
                    continue
                merges.append(list(split) if as_pairs else f"{split[0]} {split[1]}")
            model["vocab"][tok] = out.vocab[tok]
            known.add(tok)
            out.new_real.append(tok)
        if len(left) == len(remaining):
            break
        remaining = left
    for tok in remaining:
        _add_token(out, tok, out.vocab[tok], real[tok])


def _split(tok: str, own: tuple[str, str] | None, known: set[str]) -> tuple[str, str] | None:
    if own is not None and own[0] in known and own[1] in known:
        return own
    for i in range(1, len(tok)):
        if tok[:i] in known and tok[i:] in known:
            return tok[:i], tok[i:]
    return None


def _check_union(out: UnionTokenizer, base: TokenizerInfo) -> None:
    """The union loads, and every token has the id the row maps give it."""
    from tokenizers import Tokenizer

    try:
        loaded = Tokenizer.from_str(json.dumps(out.data)).get_vocab(with_added_tokens=True)
    except Exception as e:  # a bug here, reported as one line naming the base
        raise MergeError(f"the union of the tokenizers (base {base.ref!r}) does not load: {e}") from None
    wrong = [t for t, i in out.vocab.items() if loaded.get(out.spelled.get(t, t)) != i]
    if wrong:
        raise MergeError(
            f"the union of the tokenizers (base {base.ref!r}) gives token {wrong[0]!r} id "
            f"{loaded.get(out.spelled.get(wrong[0], wrong[0]))}, not {out.vocab[wrong[0]]}; use "
            "tokenizer_source: base"
        )


def tokenizer_config(cfg: dict, new_added: Sequence[dict]) -> dict:
    """tokenizer_config.json for the union: the base's, with the new added tokens in
    ``added_tokens_decoder`` where the base lists its own there."""
    out = copy.deepcopy(cfg)
    dec = out.get("added_tokens_decoder")
    if isinstance(dec, dict):
        for a in new_added:
            dec[str(a["id"])] = {k: a[k] for k in a if k != "id"}
    return out


# --- which tensors are indexed by the vocabulary ------------------------------------------------------


def vocab_tensors(model: ModelSource) -> tuple[list[str], int]:
    """The tensors with one row per token (input embedding, lm_head) and their row count."""
    cands = {
        n: info.shape[0]
        for n, info in model.tensors.items()
        if is_embedding(n) and "position" not in n and "wpe" not in n and len(info.shape) >= 1
    }
    if not cands:
        raise MergeError(f"model {model.ref!r} has no embedding tensor to re-index to another tokenizer")
    rows = _config_vocab(model.config)
    if rows not in cands.values():
        rows = max(cands.values())
    return [n for n, r in cands.items() if r == rows], rows


def _config_vocab(config: dict) -> int | None:
    v = config.get("vocab_size")
    text = config.get("text_config")
    if v is None and isinstance(text, dict):
        v = text.get("vocab_size")
    return v if isinstance(v, int) else None


def row_tensor(model: ModelSource, name: str) -> str:
    """``model``'s tensor that holds the rows of ``name`` (a tied model's lm_head is its embedding)."""
    if name in model.tensors:
        return name
    names, _ = vocab_tensors(model)
    if name.endswith("lm_head.weight") and tie_word_embeddings(model.config):
        embeds = [n for n in names if not n.endswith("lm_head.weight")]
        if embeds:
            return embeds[0]
    for n in names:  # same kind of tensor under another prefix (embed vs embed)
        if n.rsplit(".", 2)[-2:] == name.rsplit(".", 2)[-2:]:
            return n
    raise MergeError(f"model {model.ref!r} has no tensor {name!r} to take token rows from")


# --- reading rows ---------------------------------------------------------------------------------------


def gather_rows(model: ModelSource, name: str, ids: np.ndarray) -> _t.Tensor:
    """Rows ``ids`` of tensor ``name``, in that order, stored dtype: rows that lie close together are read
    in one range, so memory is the rows asked for plus small gaps."""
    info = model.tensors[name]
    out = torch.empty((len(ids), *info.shape[1:]), dtype=info.dtype)
    if len(ids) == 0:
        return out
    order = np.argsort(ids, kind="stable")
    s = ids[order]
    if s[-1] >= info.shape[0]:  # a read past the tensor would take the next tensor's bytes as a row
        raise MergeError(
            f"model {model.ref!r}: its tokenizer has token id {int(s[-1])} but tensor {name!r} has "
            f"{info.shape[0]} rows; the tokenizer does not belong to these weights (give the model its own "
            "tokenizer)"
        )
    breaks = np.nonzero(np.diff(s) > GATHER_GAP)[0] + 1
    for seg in np.split(np.arange(len(s)), breaks):
        lo, hi = int(s[seg[0]]), int(s[seg[-1]]) + 1
        block = model.read(name, (lo, hi))
        out[torch.from_numpy(order[seg])] = block[torch.from_numpy(s[seg] - lo)]
    return out


def mean_row(model: ModelSource, name: str, rows: int, chunk: int = 4096) -> _t.Tensor:
    """The mean of rows [0, rows) of ``name`` in float64, read in chunks."""
    info = model.tensors[name]
    total = torch.zeros(info.shape[1:], dtype=torch.float64)
    for r in range(0, rows, chunk):
        total += model.read(name, (r, min(rows, r + chunk))).to(torch.float64).sum(dim=0)
    return total / max(rows, 1)


# --- the plan: output vocabulary, row maps, rules ---------------------------------------------------------


@dataclass(frozen=True)
class TokenRule:
    """Where one token's row comes from, as the config's ``tokenizer.tokens`` says: a model's row for the
    token (``model``), a model's row for another token (``model_token``), zeros, or the model's mean row;
    ``force`` uses it in every model, also those that have the token."""

    kind: str  # model | model_token | zero | mean
    model: str | None = None
    token: str | None = None
    token_id: int | None = None
    force: bool = False


@dataclass
class VocabPlan:
    vocab: dict[str, int]  # output vocabulary: token -> id
    rows: int  # output rows (the vocabulary, padded)
    maps: dict[str, np.ndarray]  # model -> per output row, that model's own row, or -1 where it lacks one
    vocabs: dict[str, dict[str, int]]  # every model's (and donor's) vocabulary
    sizes: dict[str, int]  # every model's vocabulary rows (its tokenizer's size)
    order: list[str]  # the merged models, base first: who gives a row first under the default rules
    rules: dict[str, TokenRule] = field(default_factory=dict)
    init: str = "omp"
    k: int = DEFAULT_K
    base: str | None = None
    union: UnionTokenizer | None = None  # the tokenizer to write (None: the source's files are copied)
    tokenizers: dict[str, dict] = field(default_factory=dict)  # tokenizer.json of every model (subword)
    out_tokenizer: dict | None = None  # the output's tokenizer.json (subword: a token's text)

    def describe(self) -> str:
        """One line: the output vocabulary, what was added, which models are re-indexed and how rows
        they lack are made."""
        lacking = {r: int((m < 0).sum()) for r, m in self.maps.items()}
        moved = [r for r, m in self.maps.items() if not np.array_equal(m, np.arange(len(m)))]
        new = ""
        if self.union is not None:
            new = f" ({len(self.union.new_real)} new as vocabulary, {len(self.union.new_added)} as added tokens)"
        missing = ", ".join(f"{r}: {n}" for r, n in lacking.items() if n)
        return (
            f"vocabulary: {len(self.vocab)} tokens{new}, {self.rows} rows; re-indexed: "
            f"{', '.join(moved) or 'none'}; rows made ({self.init}): {missing or 'none'}"
        )

    @cached_property
    def tokens(self) -> list[str | None]:
        """Output row -> token (None for padding rows)."""
        out: list[str | None] = [None] * self.rows
        for t, i in self.vocab.items():
            out[i] = t
        return out


def row_map(vocab: dict[str, int], model_vocab: dict[str, int], rows: int, forced: set[str]) -> np.ndarray:
    m = np.full(rows, -1, dtype=np.int64)
    for tok, i in vocab.items():
        j = model_vocab.get(tok)
        if j is not None and tok not in forced:
            m[i] = j
    return m


def check_rows(model: ModelSource, tok: TokenizerInfo) -> int:
    """The model's vocabulary rows; an error when its tokenizer has ids beyond them."""
    names, rows = vocab_tensors(model)
    if tok.size > rows:
        raise MergeError(
            f"model {model.ref!r}: its tokenizer has {tok.size} token ids but tensor {names[0]!r} has {rows} "
            "rows; the tokenizer does not belong to these weights (give the model its own tokenizer)"
        )
    return rows


def wrap_sources(models: dict[str, ModelSource], plan: VocabPlan) -> dict[str, ModelSource]:
    """``models`` with every model of ``plan.maps`` whose rows are not already in output order replaced by
    a :class:`RemappedSource`; fills read from the unwrapped ``models``."""
    filler = Filler(plan, dict(models))
    out = dict(models)
    for ref, m in plan.maps.items():
        names, rows = vocab_tensors(models[ref])
        if rows == plan.rows and np.array_equal(m, np.arange(rows)):
            continue
        out[ref] = RemappedSource(models[ref], m, names, filler)
    return out


class RemappedSource(ModelSource):
    """A model whose vocabulary tensors have the output vocabulary's rows, gathered as they are read."""

    def __init__(self, inner: ModelSource, rows: np.ndarray, names: Sequence[str], filler: Filler):
        super().__init__(inner.ref, inner.path)
        self.inner = inner
        self.map = rows
        self.names = frozenset(names)
        self.filler = filler
        self.__dict__["config"] = inner.config

    def __repr__(self) -> str:
        return f"RemappedSource({self.ref!r})"

    def wrapped(self) -> list[ModelSource]:
        return [self.inner]

    @cached_property
    def tensors(self) -> dict[str, TensorInfo]:  # type: ignore[override]
        n = len(self.map)
        return {
            k: replace(v, shape=(n, *v.shape[1:])) if k in self.names else v
            for k, v in self.inner.tensors.items()
        }

    def read(self, name: str, rows: tuple[int, int] | None = None) -> _t.Tensor:
        if name not in self.names:
            return self.inner.read(name, rows)
        r0, r1 = rows if rows is not None else (0, len(self.map))
        ids = self.map[r0:r1]
        info = self.inner.tensors[name]
        own = ids >= 0
        if own.all():
            return gather_rows(self.inner, name, ids)
        out = torch.empty((r1 - r0, *info.shape[1:]), dtype=info.dtype)
        if own.any():
            out[torch.from_numpy(own)] = gather_rows(self.inner, name, ids[own])
        pos, values = self.filler.fills(self.ref, name)
        miss = np.nonzero(~own)[0]
        out[torch.from_numpy(miss)] = values[torch.from_numpy(pos[r0 + miss])].to(info.dtype)
        return out

    def read_array(self, name: str, rows: tuple[int, int] | None = None) -> np.ndarray:
        raise MergeError(f"model {self.ref!r} is re-indexed to another vocabulary: read it with read()")

    def close(self) -> None:
        self.inner.close()

    def tokenizer_files(self):
        return self.inner.tokenizer_files()


class Filler:
    """The rows each model lacks (and forced rows), per model and tensor, computed on first need."""

    def __init__(self, plan: VocabPlan, sources: dict[str, ModelSource]):
        self.plan = plan
        self.sources = sources
        self._lock = threading.Lock()
        self._done: dict[tuple[str, str], tuple[np.ndarray, Any]] = {}
        self._toks: dict[str, Any] = {}  # tokenizers.Tokenizer objects (subword), made on first need

    def fills(self, ref: str, name: str) -> tuple[np.ndarray, _t.Tensor]:
        """Per output row, the index of its row in the returned float32 matrix (-1: the model's own)."""
        with self._lock:
            key = (ref, name)
            if key not in self._done:
                self._done[key] = self._compute(ref, name)
            return self._done[key]

    def _row(self, ref: str, name: str, token: str | None = None, token_id: int | None = None) -> _t.Tensor:
        src = self.sources[ref]
        tid = token_id if token_id is not None else self.plan.vocabs[ref][token]  # type: ignore[index]
        return gather_rows(src, row_tensor(src, name), np.array([tid])).to(torch.float64)[0]

    def _compute(self, ref: str, name: str) -> tuple[np.ndarray, _t.Tensor]:
        plan = self.plan
        m = plan.maps[ref]
        need = np.nonzero(m < 0)[0]
        pos = np.full(len(m), -1, dtype=np.int64)
        pos[need] = np.arange(len(need))
        src = self.sources[ref]
        shape = src.tensors[name].shape[1:]
        values = torch.zeros((len(need), *shape), dtype=torch.float64)
        mean: list[_t.Tensor] = []

        def own_mean() -> _t.Tensor:
            if not mean:
                mean.append(mean_row(src, name, plan.sizes[ref]))
            return mean[0]

        omp_targets: dict[str, list[tuple[int, str]]] = {}
        for j, o in enumerate(need):
            tok = plan.tokens[o]
            rule = plan.rules.get(tok) if tok is not None else None
            if tok is None:
                values[j] = own_mean()
            elif rule is not None:
                values[j] = self._rule(rule, ref, name, tok, own_mean)
            else:
                holders = [r for r in plan.order if tok in plan.vocabs.get(r, {}) and r != ref]
                if plan.init == "subword":
                    values[j] = self._subword(ref, name, int(o), own_mean)
                    continue
                if plan.init == "zero" or not holders and plan.init != "mean":
                    continue
                if plan.init == "mean":
                    values[j] = own_mean()
                elif plan.init == "mergekit":
                    if plan.base in holders or len(holders) == 1:
                        values[j] = self._row(plan.base if plan.base in holders else holders[0], name, tok)
                    else:
                        values[j] = torch.stack([self._row(r, name, tok) for r in holders]).mean(dim=0)
                else:
                    omp_targets.setdefault(holders[0], []).append((j, tok))
        for donor, targets in omp_targets.items():
            self._omp(ref, name, donor, targets, values)
        return pos, values.to(torch.float32)

    def _subword(self, ref: str, name: str, out_id: int, own_mean) -> _t.Tensor:
        """The mean of the model's own rows of the tokens its tokenizer splits the token's text into."""
        from tokenizers import Tokenizer

        with_tok = self._toks
        for key, data in (("<out>", self.plan.out_tokenizer), (ref, self.plan.tokenizers.get(ref))):
            if key not in with_tok and data is not None:
                with_tok[key] = Tokenizer.from_str(json.dumps(data))
        if "<out>" not in with_tok or ref not in with_tok:
            return own_mean()
        text = with_tok["<out>"].decode([out_id], skip_special_tokens=False)
        ids = [
            i for i in with_tok[ref].encode(text, add_special_tokens=False).ids if i < self.plan.sizes[ref]
        ]
        if not ids:
            return own_mean()
        return gather_rows(self.sources[ref], name, np.array(ids)).to(torch.float64).mean(dim=0)

    def _rule(self, rule: TokenRule, ref: str, name: str, tok: str, own_mean) -> _t.Tensor:
        if rule.kind == "zero":
            return torch.zeros(self.sources[ref].tensors[name].shape[1:], dtype=torch.float64)
        if rule.kind == "mean":
            return own_mean()
        assert rule.model is not None
        if rule.kind == "model":
            return self._row(rule.model, name, tok)
        return self._row(rule.model, name, rule.token, rule.token_id)

    def _omp(self, ref: str, name: str, donor: str, targets: list[tuple[int, str]], values) -> None:
        """Rows of ``ref`` for ``targets`` (tokens ``donor`` has): the donor's row of each token as a
        combination of its rows of the tokens both share, the same combination of ``ref``'s rows."""
        plan = self.plan
        mine, theirs = plan.vocabs[ref], plan.vocabs[donor]
        shared = [t for t in theirs if t in mine and t not in plan.rules]
        if not shared:
            return
        dsrc = self.sources[donor]
        dname = row_tensor(dsrc, name)
        dict_rows = gather_rows(dsrc, dname, np.array([theirs[t] for t in shared])).reshape(len(shared), -1)
        own_ids = np.array([mine[t] for t in shared])
        # targets in batches: a step of OMP holds a batch x vocabulary matrix of correlations
        for b0 in range(0, len(targets), OMP_BATCH):
            batch = targets[b0 : b0 + OMP_BATCH]
            tgt = gather_rows(dsrc, dname, np.array([theirs[t] for _, t in batch]))
            idx, w = omp(dict_rows, tgt.reshape(len(batch), -1), plan.k)
            chosen = torch.unique(idx)
            rows = gather_rows(self.sources[ref], name, own_ids[chosen.numpy()]).to(torch.float64)
            lookup = torch.full((len(shared),), -1, dtype=torch.int64)
            lookup[chosen] = torch.arange(len(chosen))
            flat = rows.reshape(len(chosen), -1)
            for n, (j, _) in enumerate(batch):
                values[j] = (w[n] @ flat[lookup[idx[n]]]).reshape(values.shape[1:])


# files of a tokenizer that describe the vocabulary in another form: stale once tokens are added
_VOCAB_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "merges.txt")


def write_union_tokenizer(union: UnionTokenizer, base: ModelSource, folder) -> None:
    """The union's tokenizer.json, the base's tokenizer_config.json with the new added tokens, and the
    base's other tokenizer files (special tokens map, chat template). The base's vocab.json, merges.txt and
    tokenizer.model describe the base's vocabulary only, so they are not written (transformers then loads
    tokenizer.json)."""
    from mergesmith.core.model import read_json_file

    (folder / "tokenizer.json").write_text(json.dumps(union.data, ensure_ascii=False, indent=2) + "\n")
    cfg_path = base.optional_file("tokenizer_config.json")
    if cfg_path is not None:
        cfg = read_json_file(cfg_path, f"model {base.ref!r}: tokenizer_config.json")
        if isinstance(cfg, dict):
            text = json.dumps(tokenizer_config(cfg, union.new_added), indent=2, ensure_ascii=False)
            (folder / "tokenizer_config.json").write_text(text + "\n")
    for f in base.tokenizer_files():
        if f.name not in _VOCAB_FILES and f.name != "added_tokens.json":
            (folder / f.name).write_bytes(f.read_bytes())
