"""Routers built from prompts send those prompts to their expert, read through transformers' own router.

The constructed example: three experts whose prompts are made of disjoint sets of letters, on a tiny
random Llama. Routing is read from the built MoE's ``router_logits`` (what Mixtral's forward computes),
so this checks the router maths, the tensor names and the row order together.
"""

from __future__ import annotations

import logging
import random
import re

import pytest
import torch
from moe_helpers import load

from mergesmith.moe import build_moe
from tiny_models import char_tokenizer

LETTERS = ["abcdefgh", "ijklmnop", "qrstuvwx"]


def _prompts(seed: int = 0) -> list[list[str]]:
    rng = random.Random(seed)
    return [["".join(rng.choice(s) for _ in range(rng.randint(4, 9))) for _ in range(8)] for s in LETTERS]


@torch.no_grad()
def routing_accuracy(model, prompts: list[list[str]]) -> tuple[list[float], list[float]]:
    """Per layer: the fraction of prompts whose last token's top-1 expert is their own, and the same over
    all their ordinary tokens."""
    tok = char_tokenizer()
    layers = model.config.num_hidden_layers
    last, every, count = [0] * layers, [0] * layers, [0] * layers
    for expert, texts in enumerate(prompts):
        for text in texts:
            ids = torch.tensor([tok(text)["input_ids"]])
            top = [r.argmax(-1)[1:] for r in model(input_ids=ids, output_router_logits=True).router_logits]
            for layer in range(layers):
                last[layer] += int(top[layer][-1] == expert)
                every[layer] += int((top[layer] == expert).sum())
                count[layer] += len(top[layer])
    n = sum(len(t) for t in prompts)
    return [x / n for x in last], [x / c for x, c in zip(every, count)]


#: The random experts' greedy answers are noise that no router input predicts; these tests check how
#: prompts are routed, so calibrated routers are fitted on prompt tokens only here.
PROMPTS_ONLY = {"max_new_tokens": 0}


def _build(llama_models, tmp_path, mode: str, prompts) -> object:
    cfg = {
        "base_model": str(llama_models["base"]),
        "gate_mode": mode,
        "experts_per_token": 1,
        "experts": [
            {"source_model": str(llama_models[f"e{i}"]), "positive_prompts": p} for i, p in enumerate(prompts)
        ],
    }
    if mode == "calibrated":
        cfg["calibration"] = PROMPTS_ONLY
    return load(build_moe(cfg, tmp_path / mode, quiet=True).path)


@pytest.mark.parametrize(("mode", "at_least"), [("hidden", 0.9), ("hidden_avg", 0.9), ("cheap_embed", 0.9)])
def test_prompts_go_to_their_expert(llama_models, tmp_path, mode, at_least):
    last, _ = routing_accuracy(_build(llama_models, tmp_path, mode, _prompts()), _prompts())
    assert min(last) >= at_least, last


def test_calibrated_routes_every_token_and_held_out_prompts(llama_models, tmp_path):
    model = _build(llama_models, tmp_path, "calibrated", _prompts())
    last, every = routing_accuracy(model, _prompts())
    assert min(last) == 1.0 and min(every) >= 0.95, (last, every)
    held_out_last, held_out_every = routing_accuracy(model, _prompts(seed=1))
    hidden_last, hidden_every = routing_accuracy(
        _build(llama_models, tmp_path, "hidden", _prompts()), _prompts(seed=1)
    )
    assert min(held_out_last) >= 0.9, held_out_last
    assert all(c > h + 0.1 for c, h in zip(held_out_every, hidden_every)), (held_out_every, hidden_every)


def test_calibrated_softmax_is_neither_flat_nor_one_hot(llama_models, tmp_path):
    model = _build(llama_models, tmp_path, "calibrated", _prompts())
    tok = char_tokenizer()
    ids = torch.tensor(
        [tok(p)["input_ids"] for p in _prompts()[0] if len(p) == 6] or [tok("abcdef")["input_ids"]]
    )
    with torch.no_grad():
        logits = model(input_ids=ids, output_router_logits=True).router_logits
    for layer_logits in logits:
        top1 = layer_logits.softmax(-1).max(-1).values.mean()
        assert 0.5 < top1 < 0.99


def test_parallel_prompts_warn(llama_models, tmp_path, caplog):
    """Under `hidden`, layer 0's vector is the embedding of the prompts' last token: prompts that end the
    same way give parallel vectors there, which the router cannot tell apart."""
    prompts = [["abc=", "abd="], ["ijk=", "ijl="], ["qrs", "qrt"]]
    with caplog.at_level(logging.WARNING, logger="mergesmith.moe"):
        _build(llama_models, tmp_path, "hidden", prompts)
    lines = [r.getMessage() for r in caplog.records if "nearly parallel" in r.getMessage()]
    assert len(lines) == 1 and "\n" not in lines[0]
    assert "layer 0: experts 0 (" in lines[0] and "/e0) and 1 (" in lines[0] and "experts 0 (" in lines[0]
    assert "2 (" not in lines[0]  # expert 2's prompts end differently


def test_all_experts_parallel_is_one_short_line(llama_models, tmp_path, caplog):
    prompts = [["abc="], ["ijk="], ["qrs="]]
    with caplog.at_level(logging.WARNING, logger="mergesmith.moe"):
        _build(llama_models, tmp_path, "hidden", prompts)
    lines = [r.getMessage() for r in caplog.records if "nearly parallel" in r.getMessage()]
    assert len(lines) == 1 and "layer 0: all 3 experts" in lines[0]


def test_distinct_prompts_do_not_warn(llama_models, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="mergesmith.moe"):
        _build(llama_models, tmp_path, "hidden", _prompts())
    assert not [r for r in caplog.records if "nearly parallel" in r.getMessage()]


@pytest.mark.parametrize("mode", ["hidden_avg", "calibrated"])
def test_negative_prompts_push_routing_away(llama_models, tmp_path, mode):
    """Expert 0 is prompted with letters of sets 0 and 1; told to avoid set 1's, it leaves them to expert 1."""
    sets = _prompts()
    mixed = [a + b for a, b in zip(sets[0], sets[1])]

    def accuracy_on_set_1(negatives: list[str] | None) -> float:
        cfg = {
            "base_model": str(llama_models["base"]),
            "gate_mode": mode,
            "experts_per_token": 1,
            "experts": [
                {
                    "source_model": str(llama_models["e0"]),
                    "positive_prompts": mixed,
                    "negative_prompts": negatives,
                },
                {"source_model": str(llama_models["e1"]), "positive_prompts": sets[1]},
                {"source_model": str(llama_models["e2"]), "positive_prompts": sets[2]},
            ],
        }
        folder = tmp_path / ("neg" if negatives else "plain")
        _, every = routing_accuracy(
            load(build_moe(cfg, folder, quiet=True).path), [[], _prompts(seed=2)[1], []]
        )
        return sum(every) / len(every)

    plain, pushed = accuracy_on_set_1(None), accuracy_on_set_1(sets[1])
    assert pushed > plain and pushed > 0.9, (plain, pushed)


def test_calibration_trunk_runs_each_experts_prompts_through_its_own_mlps(llama_models, tmp_path):
    """Layer 0's router input comes before any feed-forward block, so both trunks fit the same layer-0
    router; deeper routers see the expert's MLP outputs with ``trunk: expert`` and differ."""
    from safetensors.torch import load_file

    def routers(trunk: str) -> list[torch.Tensor]:
        cfg = {
            "base_model": str(llama_models["base"]),
            "gate_mode": "calibrated",
            "experts_per_token": 1,
            "calibration": {"trunk": trunk, **PROMPTS_ONLY},
            "experts": [
                {"source_model": str(llama_models[f"e{i}"]), "positive_prompts": p}
                for i, p in enumerate(_prompts())
            ],
        }
        folder = build_moe(cfg, tmp_path / trunk, quiet=True).path
        tensors = {}
        for f in folder.glob("*.safetensors"):
            tensors.update(load_file(f))
        names = sorted((n for n in tensors if n.endswith(".gate.weight")), key=lambda n: int(n.split(".")[2]))
        return [tensors[n].float() for n in names]

    expert, base = routers("expert"), routers("base")
    assert len(expert) >= 2
    torch.testing.assert_close(expert[0], base[0])
    assert all(not torch.allclose(e, b) for e, b in zip(expert[1:], base[1:]))


def test_swapped_weights_are_restored(llama_models):
    from mergesmith.moe.activations import BaseRunner

    run = BaseRunner.load(llama_models["base"], "base")
    name = next(n for n, _ in run.model.named_parameters() if ".mlp." in n)
    before = dict(run.model.named_parameters())[name].detach().clone()
    plain = run.states(["abcdef"]).layer_last
    with run.swapped({name: torch.zeros_like(before)}):
        assert dict(run.model.named_parameters())[name].abs().sum() == 0
        changed = run.states(["abcdef"]).layer_last
    assert torch.equal(dict(run.model.named_parameters())[name], before)
    assert not torch.allclose(plain, changed)
    assert torch.equal(run.states(["abcdef"]).layer_last, plain)


CHANCE = "no better than chance"


def _chance_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if CHANCE in r.getMessage()]


def test_chance_level_router_warns(llama_models, tmp_path, caplog):
    """Two experts whose prompts differ only in characters the tokenizer lacks (<unk>, a special token,
    is not a calibration sample): layer 0 sees the same tokens for both, so its router is at chance."""
    same = [["abcdA", "bcdaB", "cdabE"], ["abcdC", "bcdaD", "cdabF"]]
    with caplog.at_level(logging.WARNING, logger="mergesmith.moe"):
        result = build_moe(
            {
                "base_model": str(llama_models["base"]),
                "gate_mode": "calibrated",
                "experts_per_token": 1,
                "calibration": PROMPTS_ONLY,
                "experts": [
                    {"source_model": str(llama_models[f"e{i}"]), "positive_prompts": p}
                    for i, p in enumerate(same)
                ],
            },
            tmp_path / "moe",
            quiet=True,
        )
    assert result.reports[0].calibrated.train_accuracy <= 0.5
    (line,) = _chance_lines(caplog)
    assert "in layer(s) 0 (0.500)" in line and "chance (0.500" in line
    assert str(llama_models["e0"]) in line and "tokenizer knows" in line
    bad = [r.layer for r in result.reports if r.calibrated.train_accuracy <= 0.5]
    named = line.split("in layer(s) ")[1].split(", so the MoE")[0]
    assert [int(n) for n in re.findall(r"(\d+) \(\d\.\d{3}\)", named)] == bad  # those layers, and only those


def test_good_router_does_not_warn(llama_models, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="mergesmith.moe"):
        _build(llama_models, tmp_path, "calibrated", _prompts())
    assert not _chance_lines(caplog)


def test_chance_accuracy_is_the_largest_class():
    from mergesmith.moe.gates import chance_accuracy

    assert chance_accuracy([28, 41]) == pytest.approx(41 / 69)
    assert chance_accuracy([10, 10, 10]) == pytest.approx(1 / 3)
    assert chance_accuracy([1, 1, 1, 1]) == 0.25
