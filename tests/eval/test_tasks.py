"""Exact-match scoring: right answers count, wrong ones do not, bad files fail with one clear line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import AutoTokenizer, LlamaForCausalLM

from mergesmith.core.errors import MergeError
from mergesmith.eval import evaluate_tasks, load_tasks
from mergesmith.eval.loading import load_model
from mergesmith.eval.tasks import (
    TaskSet,
    clean_prediction,
    default_max_new_tokens,
    generate_answers,
    task_name,
)

PROMPTS = ["rev: abc=", "add: 12+34=", "sort: dcba=", "get k: a1,k7=", "count a: abca=", "copy: xy="]


def write_jsonl(path: Path, records: list[object]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def own_answers(folder: Path, prompts: list[str], max_new_tokens: int) -> list[str]:
    model, tokenizer = load_model(folder)
    return generate_answers(model, tokenizer, prompts, max_new_tokens, batch_size=4)


def test_model_scores_100_on_its_own_greedy_answers(tiny_llama: Path, tmp_path: Path) -> None:
    answers = own_answers(tiny_llama, PROMPTS, 5)
    tasks = write_jsonl(
        tmp_path / "own.jsonl", [{"prompt": p, "answer": a} for p, a in zip(PROMPTS, answers, strict=True)]
    )
    assert evaluate_tasks(tiny_llama, tasks, max_new_tokens=5, batch_size=4) == {"own": 1.0}


def test_wrong_answers_score_zero_and_one_right_scores_its_share(tiny_llama: Path, tmp_path: Path) -> None:
    answers = own_answers(tiny_llama, PROMPTS, 5)
    records = [{"prompt": p, "answer": a + "#"} for p, a in zip(PROMPTS, answers, strict=True)]
    assert evaluate_tasks(tiny_llama, write_jsonl(tmp_path / "w.jsonl", records), max_new_tokens=5) == {
        "w": 0.0
    }
    records[2]["answer"] = answers[2]
    score = evaluate_tasks(tiny_llama, write_jsonl(tmp_path / "w.jsonl", records), max_new_tokens=5)
    assert score == {"w": pytest.approx(1 / len(PROMPTS))}


def test_batching_does_not_change_answers(tiny_llama: Path) -> None:
    model, tokenizer = load_model(tiny_llama)
    one_by_one = [generate_answers(model, tokenizer, [p], 6, batch_size=1)[0] for p in PROMPTS]
    assert generate_answers(model, tokenizer, PROMPTS, 6, batch_size=len(PROMPTS)) == one_by_one


def test_shipped_expert_is_perfect_on_its_own_outputs_and_right_on_real_answers(
    tmp_path: Path, models_dir: Path, data_dir: Path
) -> None:
    task = load_tasks(data_dir / "rev" / "test.jsonl")
    prompts = list(task.prompts[:64])
    real = TaskSet("rev/test", task.path, task.prompts[:64], task.answers[:64])
    answers = own_answers(models_dir / "rev", prompts, 10)
    own = write_jsonl(
        tmp_path / "own.jsonl", [{"prompt": p, "answer": a} for p, a in zip(prompts, answers, strict=True)]
    )
    scores = evaluate_tasks(models_dir / "rev", [own, real])
    assert scores["own"] == 1.0
    assert scores["rev/test"] >= 0.95


def test_in_memory_model_with_tokenizer(tiny_llama: Path, tmp_path: Path) -> None:
    model = LlamaForCausalLM.from_pretrained(tiny_llama)
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    answers = own_answers(tiny_llama, PROMPTS, 4)
    tasks = write_jsonl(
        tmp_path / "t.jsonl", [{"prompt": p, "answer": a} for p, a in zip(PROMPTS, answers, strict=True)]
    )
    assert evaluate_tasks(model, [tasks], tokenizer=tokenizer, max_new_tokens=4) == {"t": 1.0}


def test_max_new_tokens_follows_the_longest_answer(tiny_llama: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    assert default_max_new_tokens(tokenizer, ["7", "abcdefgh", "12"]) == 8 + 2


def test_prediction_is_cut_at_newline_and_stripped() -> None:
    assert clean_prediction(" 46 \nadd: 1+1=2") == "46"


def test_task_names() -> None:
    assert task_name(Path("examples/skills/data/add/test.jsonl")) == "add/test"
    assert task_name(Path("mytasks.jsonl")) == "mytasks"
    assert task_name(Path("test.jsonl")) == "test"


def test_duplicate_task_names_are_kept_apart(tiny_llama: Path, tmp_path: Path) -> None:
    for sub in ("a", "b"):
        (tmp_path / sub / "x").mkdir(parents=True)
        write_jsonl(tmp_path / sub / "x" / "test.jsonl", [{"prompt": "rev: ab=", "answer": "ba"}])
    scores = evaluate_tasks(tiny_llama, [tmp_path / "a/x/test.jsonl", tmp_path / "b/x/test.jsonl"])
    assert len(scores) == 2


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("", "is empty"),
        ("\n  \n", "is empty"),
        ('{"prompt": "a", "answer": "b"}\nnot json\n', r"bad\.jsonl:2: not JSON"),
        ('{"prompt": "a"}\n', r"bad\.jsonl:1: no 'answer' field"),
        ('{"answer": "a"}\n', r"bad\.jsonl:1: no 'prompt' field"),
        ("[1, 2]\n", r"bad\.jsonl:1: a JSON list, not an object"),
        ('{"prompt": "a", "answer": 3}\n', r"bad\.jsonl:1: 'prompt' and 'answer' must be strings"),
    ],
)
def test_bad_tasks_files_raise_one_line(tmp_path: Path, content: str, expected: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(MergeError, match=expected) as info:
        load_tasks(path)
    assert "\n" not in str(info.value)


def test_a_folder_given_as_a_tasks_file_is_called_a_folder(tmp_path: Path) -> None:
    with pytest.raises(MergeError, match="is a folder; pass a .jsonl file"):
        load_tasks(tmp_path)


def test_missing_tasks_file(tmp_path: Path) -> None:
    with pytest.raises(MergeError, match="does not exist"):
        load_tasks(tmp_path / "nope.jsonl")


def test_non_utf8_tasks_file(tmp_path: Path) -> None:
    path = tmp_path / "latin.jsonl"
    path.write_bytes(b'{"prompt": "caf\xe9", "answer": "x"}\n')
    with pytest.raises(MergeError, match="not UTF-8"):
        load_tasks(path)


def test_missing_model_folder(tmp_path: Path) -> None:
    tasks = write_jsonl(tmp_path / "t.jsonl", [{"prompt": "a", "answer": "b"}])
    with pytest.raises(MergeError, match="does not exist"):
        evaluate_tasks(tmp_path / "no-model", tasks)


def test_folder_without_config(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    tasks = write_jsonl(tmp_path / "t.jsonl", [{"prompt": "a", "answer": "b"}])
    with pytest.raises(MergeError, match="no config.json"):
        evaluate_tasks(tmp_path / "empty", tasks)


# --- answer_prob: the teacher-forced probability of the whole answer ---------------------------------------


def answer_prob_by_hand(model, tokenizer, prompt: str, answer: str) -> float:
    """One prompt at a time, no padding: the product of the answer's and the end token's probabilities,
    each read from the model's distribution after the tokens before it."""
    import torch

    ids = list(tokenizer(prompt)["input_ids"])
    prob = 1.0
    for token in [*tokenizer.encode(answer, add_special_tokens=False), tokenizer.eos_token_id]:
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids])).logits[0, -1].double()
        prob *= float(torch.softmax(logits, -1)[token])
        ids.append(token)
    return prob


def test_answer_prob_equals_the_product_of_next_token_probabilities(tiny_llama: Path) -> None:
    from mergesmith.eval.tasks import score_answer_prob

    model, tokenizer = load_model(tiny_llama)
    answers = own_answers(tiny_llama, PROMPTS, 4)
    answers[1] = "xyz"  # not the model's own: a small probability, still counted
    task = TaskSet("t", Path("t.jsonl"), tuple(PROMPTS), tuple(answers))
    expected = [answer_prob_by_hand(model, tokenizer, p, a) for p, a in zip(PROMPTS, answers, strict=True)]
    assert 0 < min(expected) and max(expected) < 1
    # batches of mixed lengths (right padding) give the unpadded values
    for batch in (1, 4, len(PROMPTS)):
        assert score_answer_prob(model, tokenizer, task, batch_size=batch) == pytest.approx(
            sum(expected) / len(expected), rel=1e-5
        )


def test_answer_prob_tells_an_expert_from_the_base(models_dir: Path, data_dir: Path) -> None:
    from mergesmith.eval.tasks import score_answer_prob

    task = load_tasks(data_dir / "rev" / "val.jsonl")
    task = TaskSet(task.name, task.path, task.prompts[:64], task.answers[:64])
    expert = score_answer_prob(*load_model(models_dir / "rev"), task)
    base = score_answer_prob(*load_model(models_dir / "base"), task)
    assert expert > 0.95 and base < 0.01
