"""Models with different tokenizers: tokenizer_source union / base / a model and the `tokenizer:` block.

Every model's embedding and lm_head rows are re-indexed to the output vocabulary before the method runs;
rows a model lacks are defined (OMP by default, or mergekit's rules, the mean, zeros, per-token sources).
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

import mergesmith
import mergesmith.pipeline.stages
import tiny_models as tm
from mergesmith.core.omp import omp

EMBED, HEAD = "model.embed_tokens.weight", "lm_head.weight"


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


@pytest.fixture(scope="module")
def family_models(tmp_path_factory):
    """Per tied/untied: base ``a``, a fine-tune ``b``, ``b`` with its vocabulary shuffled (and sharded),
    ``b`` with two tokens appended, and ``a`` lacking nothing but with ``b``'s extra tokens missing."""

    def make(tied: bool) -> dict[str, Path]:
        root = tmp_path_factory.mktemp("tied" if tied else "untied")
        cfg = tm.tiny_config("llama", layers=2, vocab=tm.VOCAB, tie_word_embeddings=tied, **tm.CHAR_IDS)
        a = tm.save(tm.build(cfg, 0), root / "a", tm.char_tokenizer())
        b = tm.perturb(a, root / "b", 0.5, 1)
        perm = list(range(tm.VOCAB))
        random.Random(0).shuffle(perm)
        bp = tm.reshard(tm.retokenize(b, root / "bp", perm))
        bx = tm.retokenize(b, root / "bx", None, {"!": None, "?": None})
        return {"a": a, "b": b, "bp": bp, "bx": bx, "perm": perm}  # type: ignore[dict-item]

    return {"untied": make(False), "tied": make(True)}


def config(method: str, base: Path, other: Path, **extra) -> dict:
    if method == "linear":
        models = [
            {"model": str(base), "parameters": {"weight": 1.0}},
            {"model": str(other), "parameters": {"weight": 1.0}},
        ]
        return {"merge_method": "linear", "models": models, "dtype": "float32", **extra}
    params = {"weight": 0.7, "density": 0.5}
    return {
        "merge_method": method,
        "base_model": str(base),
        "models": [{"model": str(base)}, {"model": str(other), "parameters": params}],
        "dtype": "float32",
        **extra,
    }


@pytest.mark.parametrize("tied", ["untied", "tied"])
@pytest.mark.parametrize("method", ["linear", "ties", "dare_ties"])
def test_union_of_a_shuffled_vocabulary_equals_the_aligned_merge(family_models, tmp_path, method, tied):
    m = family_models[tied]
    aligned = mergesmith.merge(
        config(method, m["a"], m["b"]), tmp_path / "aligned", quiet=True, random_seed=3
    )
    shuffled = mergesmith.merge(
        config(method, m["a"], m["bp"], tokenizer_source="union"),
        tmp_path / "shuffled",
        quiet=True,
        random_seed=3,
    )
    x, y = tensors(aligned), tensors(shuffled)
    assert x.keys() == y.keys()
    for k in x:
        assert torch.equal(x[k], y[k]), k
    assert json.loads((shuffled / "tokenizer.json").read_text()) == json.loads(
        (m["a"] / "tokenizer.json").read_text()
    )


def test_a_shuffled_base_gives_the_permuted_rows(family_models, tmp_path):
    """The output follows the base's token order: with the shuffled model as base, every row of the
    result is the aligned result's row of the same token (linear and TIES; DARE's mask follows output rows)."""
    m = family_models["untied"]
    perm = m["perm"]
    for method in ("linear", "ties"):
        aligned = mergesmith.merge(config(method, m["b"], m["a"]), tmp_path / f"al-{method}", quiet=True)
        shuffled = mergesmith.merge(
            config(method, m["bp"], m["a"], tokenizer_source="union"), tmp_path / f"sh-{method}", quiet=True
        )
        x, y = tensors(aligned), tensors(shuffled)
        for k in (EMBED, HEAD):
            assert torch.equal(y[k][torch.tensor(perm)], x[k]), (method, k)
        assert torch.equal(x["model.norm.weight"], y["model.norm.weight"])


def test_union_adds_the_tokens_and_keeps_base_text_and_logits(family_models, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    m = family_models["untied"]
    aligned = mergesmith.merge(config("linear", m["a"], m["b"]), tmp_path / "aligned", quiet=True)
    union = mergesmith.merge(
        config("linear", m["a"], m["bx"], tokenizer_source="union"), tmp_path / "u", quiet=True
    )
    x, y = tensors(aligned), tensors(union)
    assert y[EMBED].shape[0] == tm.VOCAB + 2 and y[HEAD].shape[0] == tm.VOCAB + 2
    for k in (EMBED, HEAD):  # the shared tokens' rows are those of the aligned merge
        assert torch.equal(y[k][: tm.VOCAB], x[k])
    assert json.loads((union / "config.json").read_text())["vocab_size"] == tm.VOCAB + 2
    tok_u, tok_a = AutoTokenizer.from_pretrained(union), AutoTokenizer.from_pretrained(m["a"])
    assert tok_u.convert_tokens_to_ids(["!", "?"]) == [tm.VOCAB, tm.VOCAB + 1]
    data = json.loads((union / "tokenizer.json").read_text())
    assert "!" in data["model"]["vocab"] and not any(a["content"] == "!" for a in data["added_tokens"])
    text = "abc 12+3=15, xyz"
    assert tok_u(text)["input_ids"] == tok_a(text)["input_ids"]
    assert tok_u("a!b")["input_ids"][2] == tm.VOCAB
    ids = torch.tensor([tok_u(text)["input_ids"]])
    with torch.no_grad():
        lu = AutoModelForCausalLM.from_pretrained(union).eval()(ids).logits
        la = AutoModelForCausalLM.from_pretrained(aligned).eval()(ids).logits
    assert torch.equal(lu[..., : tm.VOCAB], la)


def _extra_row_configs(m, init: str) -> dict:
    return config("linear", m["a"], m["bx"], tokenizer={"source": "union", "default_init": init})


@pytest.mark.parametrize("init", ["mergekit", "zero", "mean", "omp"])
def test_rows_a_model_lacks(family_models, tmp_path, init):
    """``a`` lacks b's tokens '!' and '?': its row for them follows `default_init`; the linear merge
    (weights 1:1, normalised) is the mean of a's row and b's."""
    m = family_models["untied"]
    out = tensors(mergesmith.merge(_extra_row_configs(m, init), tmp_path / init, quiet=True))
    a, bx = tensors(m["a"]), tensors(m["bx"])
    for k in (EMBED, HEAD):
        b_rows = bx[k][tm.VOCAB :]
        if init == "mergekit":  # the only model that has the token gives its row
            want = b_rows
        elif init == "zero":
            want = b_rows / 2
        elif init == "mean":
            want = (b_rows + a[k].mean(dim=0)) / 2
        else:
            continue
        assert torch.allclose(out[k][tm.VOCAB :], want, atol=1e-6), k


def test_omp_row_is_the_same_combination_of_the_models_own_rows(tmp_path):
    """b's extra token is an exact combination of 3 shared tokens of b; a (another embedding of the same
    tokens) gets the same combination of its own rows."""
    cfg = tm.tiny_config("llama", layers=1, vocab=tm.VOCAB, tie_word_embeddings=False, **tm.CHAR_IDS)
    a = tm.save(tm.build(cfg, 0), tmp_path / "a", tm.char_tokenizer())
    b = tm.perturb(a, tmp_path / "b", 1.0, 1)
    bt = tensors(b)
    combo = {k: 2.0 * bt[k][5] - 0.5 * bt[k][17] + bt[k][30] for k in (EMBED, HEAD)}
    bx = tm.retokenize(b, tmp_path / "bx", None, {"!": combo[EMBED]})
    t = tensors(bx)  # retokenize appends the same row to both tensors: set the head's own combination
    t[HEAD][tm.VOCAB] = combo[HEAD]
    from safetensors.torch import save_file

    save_file(t, bx / "model.safetensors", metadata={"format": "pt"})
    cfg_m = {
        "merge_method": "linear",
        "models": [
            {"model": str(a), "parameters": {"weight": 1.0}},
            {"model": str(bx), "parameters": {"weight": 0.0}},
        ],
        "tokenizer_source": "union",
        "dtype": "float32",
    }
    out = tensors(mergesmith.merge(cfg_m, tmp_path / "o", quiet=True))
    at = tensors(a)
    for k in (EMBED, HEAD):
        want = 2.0 * at[k][5] - 0.5 * at[k][17] + at[k][30]
        assert torch.allclose(out[k][tm.VOCAB], want, atol=1e-4), k


def test_omp_recovers_an_exact_sparse_combination():
    torch.manual_seed(0)
    d = torch.randn(60, 24, dtype=torch.float64)
    y = torch.stack([2 * d[3] - 0.5 * d[17] + d[40], d[7], torch.zeros(24)])
    idx, w = omp(d, y, k=8)
    got = {int(i): float(v) for i, v in zip(idx[0], w[0]) if abs(v) > 1e-9}
    assert got.keys() == {3, 17, 40}
    assert got[3] == pytest.approx(2.0) and got[17] == pytest.approx(-0.5) and got[40] == pytest.approx(1.0)
    rec = torch.einsum("mk,mkh->mh", w, d[idx])
    assert torch.allclose(rec, y, atol=1e-10)
    assert float(w[2].abs().sum()) == 0.0


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 10**6), st.integers(1, 5))
def test_omp_properties(seed, nnz):
    """Orthonormal atoms: the exact support and weights of a sparse target; any dictionary with k = h
    atoms: an exact fit of any target (the chosen atoms span the space)."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(32, 24, generator=g, dtype=torch.float64))
    d = q.T  # 24 orthonormal rows of width 32
    support = torch.randperm(24, generator=g)[:nnz]
    coef = torch.randn(nnz, generator=g, dtype=torch.float64).sign() * (0.5 + torch.rand(nnz, generator=g))
    y = (coef[:, None] * d[support]).sum(dim=0, keepdim=True)
    idx, w = omp(d, y, k=8)
    got = {int(i): float(v) for i, v in zip(idx[0], w[0]) if abs(v) > 1e-9}
    assert got == pytest.approx(dict(zip(support.tolist(), coef.tolist())))
    full = torch.randn(40, 16, generator=g, dtype=torch.float64)
    target = torch.randn(3, 16, generator=g, dtype=torch.float64)
    idx, w = omp(full, target, k=16)
    assert torch.allclose(torch.einsum("mk,mkh->mh", w, full[idx]), target, atol=1e-8)


# --- per-token sources -------------------------------------------------------------------------------------


def test_token_sources_and_force(family_models, tmp_path):
    m = family_models["untied"]
    tokens = {
        "a": {"source": str(m["b"]), "force": True},  # every model's row of 'a' is b's
        "!": {"source": {"kind": "zero"}},  # a lacks '!': zeros
        "b": {"source": {"kind": "model_token", "model": str(m["a"]), "token": "c"}, "force": True},
    }
    cfg = config(
        "linear", m["a"], m["bx"], tokenizer={"source": "union", "tokens": tokens, "pad_to_multiple_of": 8}
    )
    out = tensors(mergesmith.merge(cfg, tmp_path / "o", quiet=True))
    a, b, bx = tensors(m["a"]), tensors(m["b"]), tensors(m["bx"])
    ia, ib, ic = 4, 5, 6  # the character tokenizer's ids of a, b, c
    for k in (EMBED, HEAD):
        assert out[k].shape[0] == 48  # 46 + 2 tokens, padded to a multiple of 8
        assert torch.allclose(out[k][ia], b[k][ia])
        assert torch.allclose(out[k][ib], a[k][ic])
        assert torch.allclose(out[k][tm.VOCAB], bx[k][tm.VOCAB] / 2)


def test_pad_to_multiple_of_adds_mean_rows(family_models, tmp_path):
    m = family_models["untied"]
    cfg = config("linear", m["a"], m["b"], tokenizer={"source": "base", "pad_to_multiple_of": 16})
    out = mergesmith.merge(cfg, tmp_path / "o", quiet=True)
    t, a, b = tensors(out), tensors(m["a"]), tensors(m["b"])
    assert t[EMBED].shape[0] == 48 and json.loads((out / "config.json").read_text())["vocab_size"] == 48
    want = (a[EMBED].mean(0) + b[EMBED].mean(0)) / 2
    assert torch.allclose(t[EMBED][46], want, atol=1e-6)


def test_tokenizer_source_model_reindexes_and_rewrites_special_ids(family_models, tmp_path):
    """The output takes the shuffled model's tokenizer: rows follow its ids, config ids too."""
    m = family_models["untied"]
    out = mergesmith.merge(
        config("linear", m["a"], m["b"], tokenizer_source=str(m["bp"])), tmp_path / "o", quiet=True
    )
    aligned = tensors(mergesmith.merge(config("linear", m["a"], m["b"]), tmp_path / "al", quiet=True))
    t = tensors(out)
    perm = torch.tensor(m["perm"])
    assert torch.equal(t[EMBED][perm], aligned[EMBED])
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["bos_token_id"] == m["perm"][1] and cfg["eos_token_id"] == m["perm"][2]


# --- BPE ----------------------------------------------------------------------------------------------------


def _bpe(folder: Path, corpus: list[str], size: int) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=size,
        special_tokens=["<pad>", "<bos>", "<eos>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(corpus, trainer)
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    return folder


@pytest.fixture(scope="module")
def bpe_pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("bpe")
    base = _bpe(root / "base", ["the cat sat on the mat", "a cat and a hat"] * 20, 300)
    other = _bpe(root / "other", ["tokenizers merge vocabularies", "zebra quiz jumps"] * 20, 320)
    return base, other


def _union_of(base: Path, other: Path):
    from mergesmith.core.model import ModelSource
    from mergesmith.core.vocab import read_tokenizer, union_tokenizer

    infos = [read_tokenizer(ModelSource(str(p), p), "test") for p in (base, other)]
    return infos, union_tokenizer(infos[0], infos[1:])


def test_bpe_union_adds_real_vocabulary(bpe_pair):
    (base, _), union = _union_of(*bpe_pair)
    assert union.new_real and len(union.new_real) > 10
    for t in union.new_real:
        assert union.data["model"]["vocab"][t] == union.vocab[t]
    assert all(base.vocab[t] == union.vocab[t] for t in base.vocab)


def test_bpe_union_reaches_new_tokens(bpe_pair):
    from tokenizers import Tokenizer

    _, union = _union_of(*bpe_pair)
    tok = Tokenizer.from_str(json.dumps(union.data))
    ids = tok.encode("zebra").ids
    assert any(i >= min(union.vocab[t] for t in union.new_real) for i in ids)


@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_bpe_union_splits_base_text_as_the_base_did(bpe_pair, data):
    """Text made of the base's tokens (and containing no new token's string) gets the same ids."""
    from tokenizers import Tokenizer

    (info_base, _), union = _union_of(*bpe_pair)
    base_tok = Tokenizer.from_file(str(bpe_pair[0] / "tokenizer.json"))
    union_tok = Tokenizer.from_str(json.dumps(union.data))
    pieces = sorted(base_tok.decode([i]) for i in range(4, info_base.size))
    text = "".join(data.draw(st.lists(st.sampled_from(pieces), min_size=1, max_size=12)))
    new_strings = [union_tok.decode([union.vocab[t]]) for t in union.new_real]
    if any(s and s in text for s in new_strings):
        return
    assert union_tok.encode(text).ids == base_tok.encode(text).ids


def test_wordlevel_union_splits_base_text_as_the_base_did(family_models, tmp_path):
    from tokenizers import Tokenizer

    m = family_models["untied"]
    union = mergesmith.merge(
        config("linear", m["a"], m["bx"], tokenizer_source="union"), tmp_path / "u", quiet=True
    )
    ut = Tokenizer.from_file(str(union / "tokenizer.json"))
    bt = Tokenizer.from_file(str(m["a"] / "tokenizer.json"))
    rng = random.Random(0)
    for _ in range(50):
        text = "".join(rng.choice(tm.CHARS) for _ in range(rng.randint(1, 30)))
        assert ut.encode(text).ids == bt.encode(text).ids


# --- bad inputs -------------------------------------------------------------------------------------------


def _cli(cfg: dict, tmp_path: Path) -> subprocess.CompletedProcess:
    import yaml

    path = tmp_path / "cfg.yml"
    path.write_text(yaml.safe_dump(cfg))
    return subprocess.run(
        [sys.executable, "-m", "mergesmith", "merge", str(path), str(tmp_path / "out"), "-q"],
        capture_output=True,
        text=True,
    )


def _one_line_error(r: subprocess.CompletedProcess, *words: str, out: Path) -> None:
    assert r.returncode == 2, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    for w in words:
        assert w in lines[0], lines[0]
    assert not out.exists()


def test_unreadable_tokenizer_is_one_line(family_models, tmp_path):
    import shutil

    m = family_models["untied"]
    bad = tmp_path / "bad"
    shutil.copytree(m["bx"], bad)
    (bad / "tokenizer.json").write_text('{"model": {"type": "BPE", "vocab": 3}}')
    r = _cli(config("linear", m["a"], bad, tokenizer_source="union"), tmp_path)
    _one_line_error(r, "tokenizer.json cannot be read", str(bad), out=tmp_path / "out")


def test_tokenizer_larger_than_the_embedding_is_one_line(family_models, tmp_path):
    import shutil

    m = family_models["untied"]
    bad = tmp_path / "bad"
    shutil.copytree(m["b"], bad)
    shutil.copy(m["bx"] / "tokenizer.json", bad / "tokenizer.json")  # 48 tokens, 46 rows
    r = _cli(config("linear", m["a"], bad, tokenizer_source="union"), tmp_path)
    _one_line_error(r, "48 token ids", "46", out=tmp_path / "out")


@pytest.mark.parametrize(
    "tokens, words",
    [
        ({"§": {"source": {"kind": "zero"}, "force": True}}, ["'§'", "not in the output vocabulary"]),
        ({"a": {"force": True}}, ["'force' needs a 'source'"]),
        ({"!": {"source": "MODEL_A"}}, ["has no token '!'"]),
    ],
)
def test_bad_token_rules_are_one_line(family_models, tmp_path, tokens, words):
    m = family_models["untied"]
    tokens = json.loads(json.dumps(tokens).replace("MODEL_A", str(m["a"])))
    r = _cli(config("linear", m["a"], m["bx"], tokenizer={"source": "union", "tokens": tokens}), tmp_path)
    _one_line_error(r, *words, out=tmp_path / "out")


def test_tokenizer_source_rows_past_its_embedding_is_one_line(family_models, tmp_path):
    """OMP reads the source's rows of the tokens the models lack: ids past its embedding are an error,
    not the bytes of the next tensor."""
    import shutil

    m = family_models["untied"]
    bad = tmp_path / "bad"
    shutil.copytree(m["b"], bad)
    shutil.copy(m["bx"] / "tokenizer.json", bad / "tokenizer.json")  # 48 tokens, 46 rows
    r = _cli(config("linear", m["a"], m["b"], tokenizer_source=str(bad)), tmp_path)
    _one_line_error(r, str(bad), "token id 47", "46 rows", out=tmp_path / "out")


def test_union_without_tokenizer_json_is_one_line(tmp_path):
    a = tm.make_model(tmp_path / "a", vocab=tm.VOCAB)
    b = tm.make_finetune(a, tmp_path / "b")
    r = _cli(config("linear", a, b, tokenizer_source="union"), tmp_path)
    _one_line_error(r, "has no tokenizer.json", out=tmp_path / "out")


def test_plan_prints_the_vocabulary(family_models, tmp_path, capsys):
    import yaml

    from mergesmith.cli import main

    m = family_models["untied"]
    path = tmp_path / "cfg.yml"
    path.write_text(yaml.safe_dump(config("linear", m["a"], m["bx"], tokenizer_source="union")))
    assert main(["plan", str(path), "--summary"]) == 0
    line = next(ln for ln in capsys.readouterr().out.splitlines() if "vocabulary" in ln)
    assert "48 tokens (2 new as vocabulary, 0 as added tokens), 48 rows" in line
    assert f"re-indexed: {m['a']}" in line and f"{m['a']}: 2" in line


def _unigram(folder: Path, corpus: list[str], size: int) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.UnigramTrainer(vocab_size=size, special_tokens=["<pad>", "<unk>"], unk_token="<unk>")
    tok.train_from_iterator(corpus, trainer)
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    return folder


def test_unigram_union_adds_pieces_and_keeps_base_text(tmp_path):
    from tokenizers import Tokenizer

    base = _unigram(tmp_path / "base", ["the cat sat on the mat", "a cat and a hat"] * 30, 60)
    other = _unigram(tmp_path / "other", ["zebra quiz jumps over lazy dogs", "the cat"] * 30, 80)
    (info, _), union = _union_of(base, other)
    assert union.new_real and not union.new_added
    pieces = [p[0] for p in union.data["model"]["vocab"]]
    assert all(pieces[union.vocab[t]] == t for t in union.new_real)  # a piece's id is its position
    base_tok = Tokenizer.from_file(str(base / "tokenizer.json"))
    union_tok = Tokenizer.from_str(json.dumps(union.data))
    rng = random.Random(0)
    words = ["the", "cat", "sat", "on", "mat", "a", "and", "hat"]
    checked = 0
    for _ in range(40):
        text = " ".join(rng.choice(words) for _ in range(rng.randint(1, 8)))
        if any(t.replace("▁", " ").strip() and t.replace("▁", " ").strip() in text for t in union.new_real):
            continue
        assert union_tok.encode(text).ids == base_tok.encode(text).ids
        checked += 1
    assert checked >= 20
    assert any(i >= info.size for i in union_tok.encode("zebra quiz").ids)


@pytest.mark.parametrize("method", ["linear", "ties", "dare_ties"])
def test_row_chunked_union_equals_the_aligned_merge(family_models, tmp_path, monkeypatch, method):
    """Embedding and lm_head read 5 rows at a time (statistic passes re-read them): the same bytes."""
    import mergesmith.pipeline.execute as ex

    m = family_models["untied"]
    aligned = tensors(
        mergesmith.merge(config(method, m["a"], m["b"]), tmp_path / "al", quiet=True, random_seed=5)
    )
    real = ex.rows_per_chunk
    seen = []

    def small(t, method_, share):
        rows = real(t, method_, share)
        if t.name in (EMBED, HEAD) and rows > 5:
            seen.append(t.name)
            return 5
        return rows

    monkeypatch.setattr(ex, "rows_per_chunk", small)
    cfg = config(method, m["a"], m["bp"], tokenizer_source="union")
    out = tensors(mergesmith.merge(cfg, tmp_path / "sh", quiet=True, random_seed=5, workers=1))
    assert set(seen) == {EMBED, HEAD}
    for k in aligned:
        assert torch.equal(out[k], aligned[k]), k


def test_multi_stage_union_plans_with_the_stage_tokenizer(family_models, tmp_path):
    """A later stage takes the union of a stage's output, whose tokenizer (itself a union) is known from
    its plan before it runs."""
    m = family_models["untied"]
    mid = {"name": "mid", **config("linear", m["a"], m["bx"], tokenizer_source="union")}
    final = config("linear", m["b"], m["a"], tokenizer_source="union")
    final["models"][0]["model"] = "mid"
    plans = mergesmith.pipeline.stages.plan_stages([mid, final], tmp_path / "inter")
    try:
        assert plans[-1].plan.vocab is not None and plans[-1].plan.vocab.rows == tm.VOCAB + 2
    finally:
        for sp in plans:
            sp.plan.close()
    out = mergesmith.merge([mid, final], tmp_path / "out", quiet=True)
    t = tensors(out)
    assert t[EMBED].shape[0] == tm.VOCAB + 2
    assert json.loads((out / "tokenizer.json").read_text())["model"]["vocab"]["!"] == tm.VOCAB


@pytest.mark.parametrize(
    "tokens, words",
    [
        ({"a": {"forse": True}}, "tokenizer.tokens.a.forse': unknown key"),
        ({"a": {"source": {"kind": "zer"}}}, "{kind: model_token | zero | mean}, got kind 'zer'"),
        (
            {"a": {"source": {"kind": "model_token", "model": "x"}}},
            "give exactly one of 'token' or 'token_id'",
        ),
        ({"a": {"source": {"kind": "model_token", "model": "x", "tokn": "b"}}}, "tokn: Extra inputs"),
    ],
)
def test_token_block_typos_name_the_key(tokens, words):
    from mergesmith.core.errors import ConfigError
    from mergesmith.pipeline.config import parse_config

    with pytest.raises(ConfigError, match=None) as e:
        parse_config({"merge_method": "linear", "models": [{"model": "a"}], "tokenizer": {"tokens": tokens}})
    assert words in str(e.value) and "\n" not in str(e.value)


def test_bpe_token_no_merge_reaches_is_an_added_token_of_its_text(bpe_pair, tmp_path):
    """'Ġzzzzq' (no two known halves): an added token whose content is the text it stands for."""
    import shutil

    from tokenizers import Tokenizer

    other = shutil.copytree(bpe_pair[1], tmp_path / "other")
    data = json.loads((other / "tokenizer.json").read_text())
    data["model"]["vocab"]["Ġzzzzq"] = max(data["model"]["vocab"].values()) + 1
    (other / "tokenizer.json").write_text(json.dumps(data))
    _, union = _union_of(bpe_pair[0], other)
    assert union.spelled["Ġzzzzq"] == " zzzzq"
    assert any(a["content"] == " zzzzq" for a in union.new_added)
    tok = Tokenizer.from_str(json.dumps(union.data))
    assert union.vocab["Ġzzzzq"] in tok.encode("the zzzzq").ids


def test_omp_rows_do_not_depend_on_the_batch(family_models, tmp_path, monkeypatch):
    import mergesmith.core.vocab as vocab

    m = family_models["untied"]
    whole = tensors(mergesmith.merge(_extra_row_configs(m, "omp"), tmp_path / "whole", quiet=True))
    monkeypatch.setattr(vocab, "OMP_BATCH", 1)
    one = tensors(mergesmith.merge(_extra_row_configs(m, "omp"), tmp_path / "one", quiet=True))
    for k in (EMBED, HEAD):
        assert torch.allclose(whole[k], one[k], atol=1e-6)
        assert not torch.equal(whole[k][tm.VOCAB], torch.zeros_like(whole[k][tm.VOCAB]))


def test_bpe_models_union_merge_loads_in_transformers(bpe_pair, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mergesmith.core.model import ModelSource
    from mergesmith.core.vocab import read_tokenizer

    folders = []
    for i, tok_dir in enumerate(bpe_pair):
        size = read_tokenizer(ModelSource("t", tok_dir), "test").size
        cfg = tm.tiny_config("llama", layers=1, vocab=size, bos_token_id=1, eos_token_id=2, pad_token_id=0)
        folders.append(tm.save(tm.build(cfg, i), tmp_path / f"m{i}", [tok_dir / "tokenizer.json"]))
    out = mergesmith.merge(config("linear", *folders, tokenizer_source="union"), tmp_path / "out", quiet=True)
    _, union = _union_of(*bpe_pair)
    tok_u, tok_b = AutoTokenizer.from_pretrained(out), AutoTokenizer.from_pretrained(folders[0])
    text = "the cat sat on a mat and a hat"
    assert tok_u(text)["input_ids"] == tok_b(text)["input_ids"]
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.vocab_size == len(union.vocab) == tensors(out)[EMBED].shape[0]
    assert max(tok_u("zebra quiz")["input_ids"]) >= read_tokenizer(ModelSource("t", bpe_pair[0]), "t").size
