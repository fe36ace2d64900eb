"""The shipped skill models and data keep their promises: right answers, disjoint splits, loadable folders."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import AutoConfig, AutoTokenizer

from mergesmith.eval import evaluate_tasks, load_tasks

ROOT = Path(__file__).resolve().parents[2]
MODELS = ROOT / "examples" / "skills" / "models"
DATA = ROOT / "examples" / "skills" / "data"
SKILLS = sorted(p.name for p in DATA.iterdir() if p.is_dir())


def correct_answer(prompt: str) -> str:
    """Recompute the answer from the prompt alone, independently of the generator in train.py."""
    tag, _, body = prompt[:-1].partition(": ")
    if tag == "rev":
        return body[::-1]
    if tag == "sort":
        return "".join(sorted(body))
    if tag.startswith("count "):
        return str(body.count(tag.split()[1]))
    if tag == "shift":
        return "".join(chr((ord(c) - ord("a") + 1) % 26 + ord("a")) for c in body)
    raise AssertionError(f"unknown task in {prompt!r}")


def test_there_are_at_least_four_skills_each_with_a_model() -> None:
    assert len(SKILLS) >= 4
    assert all((MODELS / s / "model.safetensors").is_file() for s in SKILLS)


@pytest.mark.parametrize("skill", SKILLS)
def test_data_is_right_and_splits_are_disjoint(skill: str) -> None:
    splits = {name: load_tasks(DATA / skill / f"{name}.jsonl") for name in ("train", "val", "test")}
    prompts = {name: set(t.prompts) for name, t in splits.items()}
    assert all(len(prompts[n]) == len(splits[n]) for n in splits), "duplicate prompts inside a split"
    assert not prompts["train"] & prompts["val"]
    assert not prompts["train"] & prompts["test"]
    assert not prompts["val"] & prompts["test"]
    for task in splits.values():
        assert all(p.startswith(skill) for p in task.prompts)
        assert all(correct_answer(p) == a for p, a in zip(task.prompts, task.answers, strict=True))


@pytest.mark.parametrize("name", ["base", *SKILLS])
def test_model_folder_loads_with_auto_classes(name: str) -> None:
    config = AutoConfig.from_pretrained(MODELS / name)
    assert config.model_type == "llama"
    tokenizer = AutoTokenizer.from_pretrained(MODELS / name)
    assert tokenizer.decode(tokenizer("add: 1+2=")["input_ids"], skip_special_tokens=True) == "add: 1+2="
    assert json.loads((MODELS / name / "generation_config.json").read_text())["eos_token_id"] == 2


def test_experts_master_their_skill_and_the_base_does_not() -> None:
    tasks = [DATA / s / "test.jsonl" for s in SKILLS]
    limited = []
    for path in tasks:
        task = load_tasks(path)
        limited.append(type(task)(task.name, path, task.prompts[:60], task.answers[:60]))
    base = evaluate_tasks(MODELS / "base", limited, batch_size=60)
    for skill in SKILLS:
        assert base[f"{skill}/test"] <= 0.05, skill
        own = evaluate_tasks(MODELS / skill, [t for t in limited if t.name == f"{skill}/test"], batch_size=60)
        assert own[f"{skill}/test"] >= 0.9, skill  # 96-100 % on all 500 (docs/skills.md)


def test_skill_folders_match_the_data() -> None:
    shipped = sorted(p.name for p in MODELS.iterdir() if p.is_dir() and p.name != "base")
    assert shipped == SKILLS


@pytest.mark.parametrize("skill", SKILLS)
def test_experts_change_only_the_feed_forward_blocks(skill: str) -> None:
    """The MoE bench relies on it: base attention + an expert's MLPs computes what the expert does."""
    from safetensors.torch import load_file

    base = load_file(MODELS / "base" / "model.safetensors")
    expert = load_file(MODELS / skill / "model.safetensors")
    assert base.keys() == expert.keys()
    changed = {name for name in base if not base[name].equal(expert[name])}
    assert changed, "the expert equals the base"
    assert all(".mlp." in name for name in changed), sorted(changed)
