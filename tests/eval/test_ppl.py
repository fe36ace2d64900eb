"""Perplexity against figures computed by hand from the model's own forward pass."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, LlamaForCausalLM

from mergesmith.core.errors import MergeError
from mergesmith.eval import perplexity
from mergesmith.eval.ppl import load_text

LINES = ["add: 12+34=46", "rev: hello=olleh", "x", "sort: dcba=abcd and some more text, 1-2-3"]


def hand_nll(model: LlamaForCausalLM, ids: list[int]) -> tuple[float, int]:
    """Summed next-token NLL of one unpadded sequence, the textbook way."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0]
    logp = torch.log_softmax(logits[:-1].double(), dim=-1)
    return -float(sum(logp[i, t] for i, t in enumerate(ids[1:]))), len(ids) - 1


def test_perplexity_matches_hand_computation(tiny_llama: Path, tmp_path: Path) -> None:
    text = tmp_path / "t.txt"
    text.write_text("\n".join(LINES[:2] + [""] + LINES[2:]) + "\n", encoding="utf-8")
    model = LlamaForCausalLM.from_pretrained(tiny_llama).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    nll, count = 0.0, 0
    for line in LINES:
        n, c = hand_nll(model, tokenizer(line)["input_ids"])
        nll, count = nll + n, count + c
    expected = math.exp(nll / count)
    assert perplexity(tiny_llama, text, batch_size=3) == pytest.approx(expected, rel=1e-5)
    assert perplexity(model, text, tokenizer=tokenizer, batch_size=1) == pytest.approx(expected, rel=1e-5)


def test_long_lines_are_scored_in_windows(tmp_path: Path, tiny_llama_factory) -> None:
    folder = tiny_llama_factory(tmp_path / "short", max_positions=8)
    line = "abcdefghijklmnopqrst"  # 21 tokens with <bos>: windows of 8, 8, 5
    text = tmp_path / "long.txt"
    text.write_text(line + "\n", encoding="utf-8")
    model = LlamaForCausalLM.from_pretrained(folder).eval()
    ids = AutoTokenizer.from_pretrained(folder)(line)["input_ids"]
    parts = [hand_nll(model, ids[i : i + 8]) for i in range(0, len(ids), 8)]
    expected = math.exp(sum(n for n, _ in parts) / sum(c for _, c in parts))
    assert sum(c for _, c in parts) == 21 - 3
    assert perplexity(folder, text) == pytest.approx(expected, rel=1e-5)


def test_uniform_model_has_perplexity_equal_to_vocab_size(tiny_llama: Path, tmp_path: Path) -> None:
    model = LlamaForCausalLM.from_pretrained(tiny_llama).eval()
    with torch.no_grad():
        model.lm_head.weight.zero_()
    text = tmp_path / "t.txt"
    text.write_text("\n".join(LINES), encoding="utf-8")
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    assert perplexity(model, text, tokenizer=tokenizer) == pytest.approx(46.0, rel=1e-6)


def test_expert_finds_its_own_skill_less_surprising_than_the_base(tmp_path: Path, models_dir: Path) -> None:
    text = tmp_path / "rev.txt"
    text.write_text("rev: abcdef=fedcba\nrev: qwerty=ytrewq\n", encoding="utf-8")
    assert perplexity(models_dir / "rev", text) < perplexity(models_dir / "base", text)


@pytest.mark.parametrize("content", ["", "\n\n   \n"])
def test_empty_text_file(tmp_path: Path, content: str) -> None:
    path = tmp_path / "empty.txt"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(MergeError, match="empty.txt is empty"):
        load_text(path)


def test_missing_text_file(tmp_path: Path) -> None:
    with pytest.raises(MergeError, match="does not exist"):
        load_text(tmp_path / "nope.txt")
