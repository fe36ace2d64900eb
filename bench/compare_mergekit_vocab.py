"""Union merges with mergesmith (``default_init: mergekit``) and mergekit: the same tensors and vocabulary?

Builds tiny char-tokenizer Llamas (tests/tiny_models.py): a base, a fine-tune, the fine-tune with its ids
shuffled, and the fine-tune with two tokens appended; merges them with ``tokenizer: {source: union}`` in
both tools and prints, per config, whether the output vocabularies agree and the largest difference of a
token's row (matched by token: without a base_model, mergekit's union order depends on Python's hash
seed) or of any other tensor. mergesmith's default (OMP rows) differs from mergekit by design; with
``default_init: mergekit`` the rows should be mergekit's.

    PYTHONPATH=src python bench/compare_mergekit_vocab.py [--mergekit-yaml /work/mkvenv/bin/mergekit-yaml]
"""

from __future__ import annotations

import argparse
import random
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file
from tokenizers import Tokenizer

import mergesmith

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
import tiny_models as tm  # noqa: E402


def models(root: Path, tied: bool) -> dict[str, Path]:
    cfg = tm.tiny_config("llama", layers=2, vocab=tm.VOCAB, tie_word_embeddings=tied, **tm.CHAR_IDS)
    a = tm.save(tm.build(cfg, 0), root / "a", tm.char_tokenizer())
    b = tm.perturb(a, root / "b", 0.5, 1)
    perm = list(range(tm.VOCAB))
    random.Random(0).shuffle(perm)
    return {
        "a": a,
        "shuffled": tm.retokenize(b, root / "bp", perm),
        "extra": tm.retokenize(b, root / "bx", None, {"!": None, "?": None}),
    }


def configs(m: dict[str, Path]) -> dict[str, dict]:
    def lin(other: str) -> dict:
        return {
            "merge_method": "linear",
            "models": [
                {"model": str(m["a"]), "parameters": {"weight": 0.6}},
                {"model": str(m[other]), "parameters": {"weight": 0.4}},
            ],
            "dtype": "float32",
            "tokenizer": {"source": "union"},
        }

    ties = {
        "merge_method": "ties",
        "base_model": str(m["a"]),
        "models": [{"model": str(m["extra"]), "parameters": {"weight": 1.0, "density": 0.5}}],
        "dtype": "float32",
        "tokenizer": {"source": "union"},
    }
    forced = lin("extra")
    forced["tokenizer"]["tokens"] = {
        "a": {"source": str(m["extra"]), "force": True},
        "!": {"source": {"kind": "zero"}},
    }
    return {
        "linear, shuffled ids": lin("shuffled"),
        "linear, 2 extra tokens": lin("extra"),
        "ties, 2 extra tokens": ties,
        "linear, per-token sources": forced,
    }


def compare(cfg: dict, root: Path, mergekit: str) -> str:
    path = root / "cfg.yml"
    path.write_text(yaml.safe_dump(cfg))
    mk = root / "mk"
    r = subprocess.run([mergekit, str(path), str(mk)], capture_output=True, text=True)
    if r.returncode != 0:
        return f"mergekit failed: {r.stderr.strip().splitlines()[-1]}"
    ours_cfg = yaml.safe_load(path.read_text())
    ours_cfg["tokenizer"]["default_init"] = "mergekit"
    ms = mergesmith.merge(ours_cfg, root / "ms", quiet=True)
    a, b = load_file(ms / "model.safetensors"), load_file(mk / "model.safetensors")
    va = Tokenizer.from_file(str(ms / "tokenizer.json")).get_vocab(True)
    vb = Tokenizer.from_file(str(mk / "tokenizer.json")).get_vocab(True)
    if set(va) != set(vb):
        return f"token sets differ: {sorted(set(va) ^ set(vb))[:5]}"
    # mergekit's rows of each token, in mergesmith's order (without a base_model, mergekit's order of the
    # union depends on Python's hash seed)
    order = torch.tensor([vb[t] for t, _ in sorted(va.items(), key=lambda kv: kv[1])])
    worst = 0.0
    for k in a:
        y = b[k][order] if a[k].shape[0] == len(va) and b[k].shape[0] == len(vb) else b[k]
        if a[k].shape != y.shape:
            return f"shape of {k}: {tuple(a[k].shape)} vs mergekit {tuple(b[k].shape)}"
        worst = max(worst, float((a[k].float() - y.float()).abs().max()))
    ids = "same ids" if va == vb else "ids in another order"
    return f"same tokens ({ids}); largest difference of a token's row or a tensor: {worst:.3g}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mergekit-yaml", default="/work/mkvenv/bin/mergekit-yaml")
    args = ap.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        for tied in (False, True):
            root = Path(tmp) / ("tied" if tied else "untied")
            m = models(root, tied)
            for name, cfg in configs(m).items():
                work = root / name.replace(" ", "_").replace(",", "")
                work.mkdir()
                print(f"{'tied' if tied else 'untied'}, {name}: {compare(cfg, work, args.mergekit_yaml)}")


if __name__ == "__main__":
    main()
