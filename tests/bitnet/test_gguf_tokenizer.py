"""GGUF tokenizer metadata: tokenizers built here with the `tokenizers` library are exported with a
tiny model through `mergesmith bitnet --format gguf`, read back with gguf's reader, and checked
against what llama.cpp needs (ids, token types, merges or scores, pre-tokenizer name, BOS/EOS flags).
For the SentencePiece-style case a small model of llama.cpp's SentencePiece merge loop checks that
the written scores split random texts exactly as transformers' BPE does."""

from __future__ import annotations

import argparse
import io
import json
import re

import gguf
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from _cli import run_command
from mergesmith.bitnet import command
from mergesmith.bitnet.gguf_tokenizer import LLAMA3_REGEX, SPM_SPACE, tokenizer_metadata
from mergesmith.core.errors import MergeError

TEXTS = [
    "The quick brown fox jumps over the lazy dog. It's 12345 o'clock!!",
    "hello world, hello there; don't   stop -- 2024-06-01\n\nnew  line\ttab",
    "reverse of abc=cba, sort of cab=abc, count of aaa=3",
] * 8
SPECIALS = ["<unk>", "<s>", "</s>"]
BYTES = [f"<0x{i:02X}>" for i in range(256)]
VOCAB = 512
TT = gguf.TokenType


def _byte_level(post: bool, llama3: bool = False, ignore_merges: bool = False) -> Tokenizer:
    tok = Tokenizer(models.BPE(ignore_merges=ignore_merges))
    if llama3:
        split = pre_tokenizers.Split(pattern=Regex(LLAMA3_REGEX), behavior="isolated", invert=False)
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [split, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
        )
    else:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(TEXTS, trainer)
    tok.add_tokens(["<tag>"])  # a non-special added token: USER_DEFINED
    if post:
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", tok.token_to_id("<s>"))]
        )
    return tok


def _spm(form: str, closed: bool = True) -> Tokenizer:
    """A Llama-2-style BPE (byte_fallback, ``<0xNN>`` tokens). ``closed``: merges regenerated the
    way a SentencePiece vocabulary is converted (every split of a token into two tokens, ordered by
    the token's id), which llama.cpp's SentencePiece tokenizer reproduces exactly."""
    tok = Tokenizer(models.BPE(byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement=SPM_SPACE, prepend_scheme="always", split=True)
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS + BYTES)
    tok.train_from_iterator(TEXTS, trainer)
    data = json.loads(tok.to_str())
    if closed:
        vocab = data["model"]["vocab"]
        merges = []
        for piece in sorted(vocab, key=vocab.__getitem__):
            if piece in SPECIALS or piece in BYTES:
                continue
            splits = [(piece[:c], piece[c:]) for c in range(1, len(piece))]
            splits = [s for s in splits if s[0] in vocab and s[1] in vocab]
            merges += sorted(splits, key=lambda s: (vocab[s[0]], vocab[s[1]]))
        data["model"]["merges"] = [list(m) for m in merges]
    if form == "prepend":
        data["pre_tokenizer"] = None
        data["normalizer"] = {
            "type": "Sequence",
            "normalizers": [
                {"type": "Prepend", "prepend": SPM_SPACE},
                {"type": "Replace", "pattern": {"String": " "}, "content": SPM_SPACE},
            ],
        }
    tok = Tokenizer.from_str(json.dumps(data))
    tok.add_tokens(["<tag>"])
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    return tok


def _export(tmp_path, tiny, tok: Tokenizer | None, config: dict | None = None, out_name="m.gguf"):
    """Save a tiny Llama with ``tok`` and export it with the command; returns (reader, stdout, stderr)."""
    model, _ = tiny(hidden_size=256, intermediate_size=256, num_hidden_layers=1, vocab_size=VOCAB)
    path = tmp_path / "model"
    model.save_pretrained(path)
    if tok is not None:
        tok.save(str(path / "tokenizer.json"))
    cfg = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", **(config or {})}
    (path / "tokenizer_config.json").write_text(json.dumps(cfg))
    parser = argparse.ArgumentParser()
    command.register(parser.add_subparsers())
    args = parser.parse_args(["bitnet", str(path), str(tmp_path / out_name), "--format", "gguf"])
    out, err = io.StringIO(), io.StringIO()
    assert run_command(args, out, err) == 0
    return gguf.GGUFReader(tmp_path / out_name), out.getvalue(), err.getvalue()


def _field(reader: gguf.GGUFReader, key: str):
    field = reader.fields.get(key)
    if field is None:
        return None
    values = [field.parts[i] for i in field.data]
    if field.types[0] == gguf.GGUFValueType.ARRAY:
        if field.types[-1] == gguf.GGUFValueType.STRING:
            return [bytes(v).decode() for v in values]
        return [v.tolist()[0] for v in values]
    if field.types[0] == gguf.GGUFValueType.STRING:
        return bytes(values[0]).decode()
    return values[0].tolist()[0]


def _check_vocab(reader, tok: Tokenizer):
    tokens, types = _field(reader, "tokenizer.ggml.tokens"), _field(reader, "tokenizer.ggml.token_type")
    assert len(tokens) == len(types) == VOCAB
    vocab = tok.get_vocab(with_added_tokens=True)
    for text, idx in vocab.items():
        assert tokens[idx] == text
    assert tokens[len(vocab)] == f"[PAD{len(vocab)}]" and types[len(vocab)] == TT.UNUSED
    for s in SPECIALS:
        assert types[vocab[s]] == TT.CONTROL
    assert types[vocab["<tag>"]] == TT.USER_DEFINED
    assert _field(reader, "tokenizer.ggml.bos_token_id") == vocab["<s>"]
    assert _field(reader, "tokenizer.ggml.eos_token_id") == vocab["</s>"]
    assert _field(reader, "tokenizer.ggml.unk_token_id") == vocab["<unk>"]
    return tokens, types


@pytest.mark.parametrize("post", [True, False])
def test_byte_level_bpe_is_gpt2_with_the_gpt2_pre_tokenizer(tmp_path, tiny, post):
    tok = _byte_level(post)
    reader, _, err = _export(tmp_path, tiny, tok)
    assert "note" not in err.replace("destroys its quality", "")
    assert _field(reader, "tokenizer.ggml.model") == "gpt2"
    assert _field(reader, "tokenizer.ggml.pre") == "gpt-2"
    _, types = _check_vocab(reader, tok)
    assert types[tok.token_to_id("Ġthe")] == TT.NORMAL
    merges = json.loads(tok.to_str())["model"]["merges"]
    assert _field(reader, "tokenizer.ggml.merges") == [" ".join(m) for m in merges] and merges
    assert _field(reader, "tokenizer.ggml.add_bos_token") is post
    assert _field(reader, "tokenizer.ggml.add_eos_token") is False
    assert (tok.encode("hi").ids[0] == tok.token_to_id("<s>")) is post  # what transformers does


@pytest.mark.parametrize("ignore_merges", [True, False])
def test_llama3_regex_is_llama_bpe_only_with_ignore_merges(tmp_path, tiny, ignore_merges):
    reader, _, err = _export(tmp_path, tiny, _byte_level(True, llama3=True, ignore_merges=ignore_merges))
    if ignore_merges:
        assert _field(reader, "tokenizer.ggml.pre") == "llama-bpe"
    else:
        assert _field(reader, "tokenizer.ggml.model") == "none"
        assert "'llama-bpe'" in err and "ignore_merges" in err and err.count("note:") == 1


def _tok_json(tok: Tokenizer) -> dict:
    return json.loads(tok.to_str())


def test_unknown_pre_tokenizer_regex_is_refused():
    tj = _tok_json(_byte_level(False))
    tj["pre_tokenizer"] = {
        "type": "Sequence",
        "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": r"\p{L}+|\s+"}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
        ],
    }
    kv, note = tokenizer_metadata(tj, {}, VOCAB)
    assert dict((k, v) for k, v, _ in kv) == {"tokenizer.ggml.model": "none"}
    assert "matches no llama.cpp pre-tokenizer" in note and "\n" not in note


def test_word_level_with_words_is_refused_with_a_note(tmp_path, tiny):
    tok = Tokenizer(models.WordLevel({"<unk>": 0, "<s>": 1, "</s>": 2, "hello": 3}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    reader, _, err = _export(tmp_path, tiny, tok)
    assert _field(reader, "tokenizer.ggml.model") == "none"
    assert _field(reader, "tokenizer.ggml.tokens") is None
    assert "WordLevel is exported only for a character-level tokenizer" in err
    assert "token ids only" in err and err.count("note:") == 1


def test_character_level_word_level_is_byte_level_bpe(tmp_path, tiny):
    """The shipped skill models' tokenizer: one token per character (Split on '.'), bos prepended."""
    chars = ["a", "b", " ", "=", "\u00e9", "\u4e2d"]
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{c: 3 + i for i, c in enumerate(chars)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.add_special_tokens(SPECIALS)
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", 1)]
    )
    reader, _, err = _export(tmp_path, tiny, tok)
    assert (
        _field(reader, "tokenizer.ggml.model") == "gpt2" and _field(reader, "tokenizer.ggml.pre") == "gpt-2"
    )
    tokens = _field(reader, "tokenizer.ggml.tokens")
    # byte-level text: " " is U+0120, "é" its two UTF-8 bytes, "中" its three
    assert tokens[:9] == [
        "<unk>",
        "<s>",
        "</s>",
        "a",
        "b",
        "\u0120",
        "=",
        "\u00c3\u00a9",
        "\u00e4\u00b8\u0143",
    ]
    assert _field(reader, "tokenizer.ggml.merges") == [
        "\u00c3 \u00a9",
        "\u00e4 \u00b8",
        "\u00e4\u00b8 \u0143",
    ]
    assert _field(reader, "tokenizer.ggml.add_bos_token") is True
    assert _field(reader, "tokenizer.ggml.bos_token_id") == 1
    assert "drops characters that are not in the vocabulary" in err


def _spm_reference(text: str, tokens: list[str], scores: list[float], add_space_prefix: bool) -> list[int]:
    """llama.cpp's SentencePiece loop: start from characters, repeatedly merge the adjacent pair
    whose concatenation is a token with the highest score (leftmost on ties); characters that are
    not tokens become their UTF-8 byte tokens (``llm_tokenizer_spm_session`` in llama-vocab.cpp)."""
    if not text:  # llama.cpp has no fragment to tokenize, so adds no space prefix
        return []
    ids = {t: i for i, t in enumerate(tokens)}
    symbols = list(((" " if add_space_prefix else "") + text).replace(" ", SPM_SPACE))
    while True:
        best = None
        for i in range(len(symbols) - 1):
            idx = ids.get(symbols[i] + symbols[i + 1])
            if idx is not None and (best is None or scores[idx] > best[0]):
                best = (scores[idx], i)
        if best is None:
            break
        i = best[1]
        symbols[i : i + 2] = [symbols[i] + symbols[i + 1]]
    out = []
    for s in symbols:
        out += [ids[s]] if s in ids else [ids[f"<0x{b:02X}>"] for b in s.encode()]
    return out


@pytest.fixture(scope="module")
def spm_prepend():
    tok = _spm("prepend")
    kv, note = tokenizer_metadata(_tok_json(tok), {"bos_token": "<s>", "eos_token": "</s>"}, VOCAB)
    return tok, {k: v for k, v, _ in kv}, note


ALPHABET = "abcdefghilnorstuw .,'!1\u00e9\u4e2d"


@settings(max_examples=60, deadline=None)
@given(text=st.text(alphabet=ALPHABET, min_size=0, max_size=30))
def test_spm_scores_reproduce_bpe(spm_prepend, text):
    """With the exported scores, llama.cpp's merge loop gives transformers' ids on any text."""
    tok, meta, note = spm_prepend
    assert note is None
    ids = _spm_reference(text, meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.scores"], True)
    assert ids == tok.encode(text, add_special_tokens=False).ids


@pytest.mark.parametrize("form", ["prepend", "metaspace"])
def test_metaspace_byte_fallback_bpe_is_llama(tmp_path, tiny, form):
    tok = _spm(form)
    reader, _, err = _export(tmp_path, tiny, tok)
    assert _field(reader, "tokenizer.ggml.model") == "llama"
    assert _field(reader, "tokenizer.ggml.merges") is None
    tokens, types = _check_vocab(reader, tok)
    assert [types[tok.token_to_id(b)] for b in BYTES] == [TT.BYTE] * 256
    assert types[tok.token_to_id(f"{SPM_SPACE}the")] == TT.NORMAL
    scores = _field(reader, "tokenizer.ggml.scores")
    merges = _tok_json(tok)["model"]["merges"]
    first = {}
    for rank, (a, b) in enumerate(merges):
        first.setdefault(a + b, rank)
    assert all(scores[tok.token_to_id(t)] == -r for t, r in first.items())
    assert _field(reader, "tokenizer.ggml.add_space_prefix") is True
    assert _field(reader, "tokenizer.ggml.add_bos_token") is True
    assert _field(reader, "tokenizer.ggml.add_eos_token") is False
    assert ("begin with a space" in err) is (form == "metaspace")
    for text in TEXTS[:3]:  # away from a leading space, Metaspace and Prepend agree
        assert _spm_reference(text, tokens, scores, True) == tok.encode(text, add_special_tokens=False).ids


def test_a_token_no_merge_builds_gets_a_note():
    """A token whose two halves are tokens but that no merge builds: BPE never produces it, llama.cpp's
    SentencePiece loop does; the export says so."""
    tj = _tok_json(_spm("prepend"))
    vocab = tj["model"]["vocab"]
    vocab[f"{SPM_SPACE}the{SPM_SPACE}the"] = 1 + max(a["id"] for a in tj["added_tokens"])
    meta, note = tokenizer_metadata(tj, {}, VOCAB)
    meta = {k: v for k, v, _ in meta}
    assert meta["tokenizer.ggml.model"] == "llama"
    assert note is not None and "may split some words differently (1 token splits are not merges)" in note
    tok = Tokenizer.from_str(json.dumps(tj))
    spm = _spm_reference("the the", meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.scores"], True)
    assert len(spm) == 1 and len(tok.encode("the the", add_special_tokens=False).ids) == 2


def test_eos_flag_from_the_template_and_from_tokenizer_config():
    tj = _tok_json(_byte_level(False))
    meta = {
        k: v for k, v, _ in tokenizer_metadata(tj, {"add_eos_token": True, "eos_token": "</s>"}, VOCAB)[0]
    }
    assert meta["tokenizer.ggml.add_eos_token"] is True and meta["tokenizer.ggml.add_bos_token"] is False
    tj["post_processor"] = {
        "type": "TemplateProcessing",
        "single": [{"Sequence": {"id": "A", "type_id": 0}}, {"SpecialToken": {"id": "</s>", "type_id": 0}}],
        "pair": [],
        "special_tokens": {},
    }
    meta = {k: v for k, v, _ in tokenizer_metadata(tj, {"add_eos_token": False}, VOCAB)[0]}
    assert meta["tokenizer.ggml.add_eos_token"] is True  # the template wins, as in transformers
    assert meta["tokenizer.ggml.eos_token_id"] == 2


def test_gguf_file_named_out_is_written_atomically_and_reports_kept_matrices(tmp_path, tiny):
    model, _ = tiny(hidden_size=256, intermediate_size=320, num_hidden_layers=1)
    src = tmp_path / "model"
    model.save_pretrained(src)
    parser = argparse.ArgumentParser()
    command.register(parser.add_subparsers())
    target = tmp_path / "out.gguf"

    def run(*extra):
        args = parser.parse_args(["bitnet", str(src), str(target), "--format", "gguf", *extra])
        out = io.StringIO()
        run_command(args, out, io.StringIO())
        return out.getvalue()

    out = run()
    assert target.is_file() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out.gguf")]
    # q, k, v, o, gate, up fit 256-wide blocks; down_proj (in_features 320) does not
    assert "GGUF: 6 of 7 selected matrices are TQ2_0, 1 kept in high precision" in out
    assert re.search(r"TQ2_0 holds \d+\.\d% of the matrix weights, general.file_type = MOSTLY_TQ2_0", out)
    assert "down_proj: kept in high precision (in_features 320 is not a multiple of 256)" in out
    with pytest.raises(MergeError, match="already exists; pass --overwrite"):
        run()
    run("--overwrite")
    assert gguf.GGUFReader(target).fields["general.file_type"].parts[-1][0] == gguf.LlamaFileType.MOSTLY_TQ2_0
    with pytest.raises(MergeError, match="add --format gguf"):
        parser.parse_args(["bitnet", str(src), str(target)]).func(
            parser.parse_args(["bitnet", str(src), str(target)])
        )


def test_file_type_names_the_type_holding_most_matrix_weights(tmp_path, tiny):
    """The shipped skill models' shape: only down_proj fits, so most weights stay F16."""
    model, _ = tiny(hidden_size=128, intermediate_size=1024, num_hidden_layers=1)
    src = tmp_path / "model"
    model.half().save_pretrained(src)
    parser = argparse.ArgumentParser()
    command.register(parser.add_subparsers())
    args = parser.parse_args(["bitnet", str(src), str(tmp_path / "o.gguf"), "--format", "gguf"])
    out = io.StringIO()
    run_command(args, out, io.StringIO())
    assert "GGUF: 1 of 7 selected matrices are TQ2_0, 6 kept" in out.getvalue()
    assert "general.file_type = MOSTLY_F16" in out.getvalue()
    reader = gguf.GGUFReader(tmp_path / "o.gguf")
    assert reader.fields["general.file_type"].parts[-1][0] == gguf.LlamaFileType.MOSTLY_F16


def test_failed_gguf_file_export_leaves_nothing(tmp_path, tiny):
    model, _ = tiny()  # hidden 64: no matrix fits a 256-wide TQ block, so the export fails
    src = tmp_path / "model"
    model.save_pretrained(src)
    parser = argparse.ArgumentParser()
    command.register(parser.add_subparsers())
    args = parser.parse_args(["bitnet", str(src), str(tmp_path / "o.gguf"), "--format", "gguf"])
    with pytest.raises(MergeError, match="no weight"):
        run_command(args, io.StringIO(), io.StringIO())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    args = parser.parse_args(["bitnet", str(src), str(src / "x.gguf"), "--format", "gguf"])
    with pytest.raises(MergeError, match="is inside the input"):
        run_command(args, io.StringIO(), io.StringIO())
