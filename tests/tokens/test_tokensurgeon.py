"""``mergesmith tokensurgeon MODEL DONOR OUT``: MODEL's weights with DONOR's tokenizer."""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import tiny_models as tm
from mergesmith.tokens import transplant_tokenizer

EMBED, HEAD = "model.embed_tokens.weight", "lm_head.weight"
PERM = list(range(tm.VOCAB))
random.Random(1).shuffle(PERM)


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def char_model(folder: Path, tied: bool, seed: int) -> Path:
    cfg = tm.tiny_config("llama", layers=2, vocab=tm.VOCAB, tie_word_embeddings=tied, **tm.CHAR_IDS)
    return tm.save(tm.build(cfg, seed), folder, tm.char_tokenizer())


@pytest.fixture(scope="module", params=["untied", "tied"])
def pair(request, tmp_path_factory):
    """A model, and a donor: another model whose embeddings are the model's times an invertible matrix,
    with its vocabulary shuffled and a token '!' whose row is 2*e(a) - 0.5*e(m) + e(7) of its own rows."""
    tied = request.param == "tied"
    root = tmp_path_factory.mktemp(request.param)
    model = tm.reshard(char_model(root / "model", tied, 0), 2)
    other = char_model(root / "other", tied, 3)
    g = torch.Generator().manual_seed(0)
    mt, ot = tensors(model), tensors(other)
    mix = torch.eye(32) + 0.3 * torch.randn(32, 32, generator=g)
    for k in (EMBED, HEAD):
        if k in ot:
            ot[k] = mt[k] @ mix
    (other / "model.safetensors").unlink()
    save_file(ot, other / "model.safetensors", metadata={"format": "pt"})
    ids = {"a": 4, "m": 16, "7": 37}
    row = 2 * ot[EMBED][ids["a"]] - 0.5 * ot[EMBED][ids["m"]] + ot[EMBED][ids["7"]]
    donor = tm.retokenize(other, root / "donor", PERM, {"!": row})
    if not tied:  # the head's row of '!': the same combination of the donor's head rows
        dt = tensors(donor)
        dt[HEAD][tm.VOCAB] = (
            2 * dt[HEAD][PERM[ids["a"]]] - 0.5 * dt[HEAD][PERM[ids["m"]]] + dt[HEAD][PERM[ids["7"]]]
        )
        save_file(dt, donor / "model.safetensors", metadata={"format": "pt"})
    return model, donor, ids, tied


def test_rows_follow_the_donor_and_omp_rebuilds_the_new_token(pair, tmp_path):
    model, donor, ids, tied = pair
    out = transplant_tokenizer(model, donor, tmp_path / "out", quiet=True)
    t, m = tensors(out), tensors(model)
    names = (EMBED,) if tied else (EMBED, HEAD)
    assert (HEAD in t) == (not tied)
    perm = torch.tensor(PERM)
    for k in names:
        assert t[k].shape[0] == tm.VOCAB + 1
        assert torch.equal(t[k][perm], m[k])  # every shared token's row, moved to the donor's id
        want = 2 * m[k][ids["a"]] - 0.5 * m[k][ids["m"]] + m[k][ids["7"]]
        assert torch.allclose(t[k][tm.VOCAB], want, atol=1e-4), k
    cfg = json.loads((out / "config.json").read_text())
    assert (
        cfg["vocab_size"] == tm.VOCAB + 1
        and cfg["bos_token_id"] == PERM[1]
        and cfg["eos_token_id"] == PERM[2]
    )
    assert (out / "tokenizer.json").read_bytes() == (donor / "tokenizer.json").read_bytes()


def test_output_runs_as_the_model_did_with_the_donor_tokenizer(pair, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, donor, _, _ = pair
    out = transplant_tokenizer(model, donor, tmp_path / "out", quiet=True)
    text = "abc 12+3=15"
    ids_new = AutoTokenizer.from_pretrained(out)(text, return_tensors="pt")["input_ids"]
    ids_old = AutoTokenizer.from_pretrained(model)(text, return_tensors="pt")["input_ids"]
    assert ids_new.tolist() == [[PERM[i] for i in ids_old[0].tolist()]]
    with torch.no_grad():
        new = AutoModelForCausalLM.from_pretrained(out).eval()(ids_new).logits
        old = AutoModelForCausalLM.from_pretrained(model).eval()(ids_old).logits
    assert torch.allclose(new[..., torch.tensor(PERM)], old, atol=1e-5)


@pytest.mark.parametrize("init", ["mean", "zero", "subword"])
def test_simpler_inits(pair, tmp_path, init):
    model, donor, _, _ = pair
    out = tensors(transplant_tokenizer(model, donor, tmp_path / init, init=init, quiet=True))
    m = tensors(model)
    if init == "mean":
        want = m[EMBED].mean(dim=0)
    elif init == "zero":
        want = torch.zeros(32)
    else:  # '!' is one character the model's tokenizer does not know: its <unk> row
        want = m[EMBED][3]
    assert torch.allclose(out[EMBED][tm.VOCAB], want, atol=1e-6)


def test_subword_init_averages_the_pieces(tmp_path):
    """A donor token 'ab' (an added token): the mean of the model's rows of 'a' and 'b'."""
    model = char_model(tmp_path / "model", False, 0)
    donor = shutil.copytree(model, tmp_path / "donor")
    tok = json.loads((donor / "tokenizer.json").read_text())
    tok["added_tokens"].append(
        {
            "id": tm.VOCAB,
            "content": "ab",
            "single_word": False,
            "lstrip": False,
            "rstrip": False,
            "normalized": False,
            "special": False,
        }
    )
    (donor / "tokenizer.json").write_text(json.dumps(tok))
    out = tensors(transplant_tokenizer(model, donor, tmp_path / "out", init="subword", quiet=True))
    m = tensors(model)
    assert torch.allclose(out[EMBED][tm.VOCAB], (m[EMBED][4] + m[EMBED][5]) / 2, atol=1e-6)


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mergesmith", "tokensurgeon", *args], capture_output=True, text=True
    )


def test_bad_inputs_are_one_line_and_write_nothing(pair, tmp_path):
    model, donor, _, _ = pair
    bad = shutil.copytree(donor, tmp_path / "bad")
    (bad / "tokenizer.json").write_text("{not json")
    bare = shutil.copytree(donor, tmp_path / "bare")  # no tokenizer.json: nothing to re-index by
    (bare / "tokenizer.json").unlink()
    big = shutil.copytree(donor, tmp_path / "big")  # a tokenizer with more ids than the donor's rows
    tok = json.loads((big / "tokenizer.json").read_text())
    n = len(tok["model"]["vocab"])
    tok["model"]["vocab"].update({f"zz{i}": n + i for i in range(5)})
    (big / "tokenizer.json").write_text(json.dumps(tok))
    for args, words in [
        ((str(model), str(bad)), "tokenizer.json cannot be read"),
        ((str(model), str(bare)), "DONOR"),
        ((str(bare), str(model)), "MODEL"),
        ((str(model), str(big)), "does not belong"),
        ((str(model), str(model)), "same folder"),
        ((str(model), str(donor), "--init", "magic"), "invalid choice"),
    ]:
        out = tmp_path / "out"
        r = _cli(args[0], args[1], str(out), "-q", *args[2:])
        lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
        assert r.returncode == 2 and len(lines) == 1 and words in lines[0], r.stderr
        assert not out.exists()


def test_cli_writes_with_a_progress_bar(pair, tmp_path):
    model, donor, _, _ = pair
    r = _cli(str(model), str(donor), str(tmp_path / "out"))
    assert r.returncode == 0, r.stderr
    assert "wrote" in r.stdout and "%" in r.stderr
    assert (tmp_path / "out" / "tokenizer.json").exists()
