"""``mergesmith search``: config errors, convergence on a closed-form fitness, resume, parallel runs, and
best.yml re-merging to the bytes that were scored."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from safetensors.numpy import load_file

from mergesmith.cli import main
from mergesmith.core.errors import MergeError
from mergesmith.search import search
from mergesmith.search.config import parse_search_config
from mergesmith.search.engine import Merger
from tiny_models import make_finetune, make_model

ROOT = Path(__file__).resolve().parent.parent
SKILLS = ROOT / "examples" / "skills"
# the recipe the closed-form fitness is built around: per-block weights of two models (2 blocks of 2 layers)
TARGET = {"a": [0.3, 0.8], "b": [0.6, 0.2]}


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("search-models")
    base = make_model(root / "base", layers=4)
    (root / "tasks.jsonl").write_text('{"prompt": "a", "answer": "b"}\n')  # read, never scored (score_fn)
    return {
        "tasks": root / "tasks.jsonl",
        "base": base,
        "a": make_finetune(base, root / "a", scale=0.2, seed=1),
        "b": make_finetune(base, root / "b", scale=0.2, seed=2),
    }


def genome_config(models: dict[str, Path], **extra) -> dict:
    cfg = {
        "genome": {
            "models": [str(models["a"]), str(models["b"])],
            "base_model": str(models["base"]),
            "merge_method": "task_arithmetic",
            "layer_granularity": 2,
        },
        "tasks": [{"name": "closed-form", "tasks_file": str(models["tasks"])}],
        "optimizer": {"name": "cmaes", "population": 8, "bounds": {"weight": [0.0, 1.0]}},
    }
    for key, value in extra.items():
        cfg[key] = {**cfg.get(key, {}), **value} if isinstance(value, dict) else value
    return cfg


def skills_genome(method: str, granularity: int, **extra) -> dict:
    """The genome of a search over the shipped rev and sort experts."""
    return {
        "models": [str(SKILLS / "models" / s) for s in ("rev", "sort")],
        "base_model": str(SKILLS / "models" / "base"),
        "merge_method": method,
        "layer_granularity": granularity,
        **extra,
    }


class Distance:
    """Fitness: minus the mean squared distance of the merged tensors to a target model's (picklable, so
    that worker processes get it)."""

    def __init__(self, target: dict[str, np.ndarray]):
        self.target = target

    def __call__(self, tensors: dict) -> float:
        total = sum(
            float(np.mean((np.asarray(tensors[k], np.float64) - t) ** 2)) for k, t in self.target.items()
        )
        return -1e4 * total / len(self.target)


@pytest.fixture(scope="module")
def distance(models) -> Distance:
    cfg = {
        "merge_method": "task_arithmetic",
        "base_model": str(models["base"]),
        "models": [
            {"model": str(models[m]), "parameters": {"weight": [v for v in TARGET[m] for _ in range(2)]}}
            for m in ("a", "b")
        ],
    }
    merger = Merger()
    _, tensors = merger.merge(cfg)
    merger.close()
    return Distance({k: np.asarray(v, np.float64) for k, v in tensors.items()})


def run_search(models, out: Path, score_fn, **kwargs):
    cfg = parse_search_config(genome_config(models))
    kwargs.setdefault("max_evals", 48)
    return search(cfg, out, quiet=True, write_model=False, score_fn=score_fn, **kwargs)


def summary_of(result) -> list[tuple]:
    return [(c.evaluation, c.generation, c.x, c.fitness, c.cached) for c in result.candidates]


def test_in_memory_merge_equals_the_merge_written_with_or_without_the_input_cache(models, tmp_path):
    cfg = {
        "merge_method": "ties",
        "base_model": str(models["base"]),
        "models": [
            {"model": str(models["a"]), "parameters": {"weight": [0.2, 0.9, 0.4, 1.3], "density": 0.4}},
            {"model": str(models["b"]), "parameters": {"weight": 0.7, "density": [0.8, 0.1]}},
        ],
    }
    written = mergesmith_merge(cfg, tmp_path / "out")
    for cache_bytes in (None, 0):  # 0: nothing kept, every read streams from disk
        merger = Merger(cache_bytes=cache_bytes)
        for _ in range(2):  # the second merge reads from the cache (when there is one)
            _, tensors = merger.merge(cfg)
            assert {k: v.tobytes() for k, v in tensors.items()} == {
                k: v.tobytes() for k, v in written.items()
            }
        assert bool(merger.cache) == (cache_bytes is None)
        merger.close()


def mergesmith_merge(cfg: dict, out: Path) -> dict[str, np.ndarray]:
    import mergesmith

    mergesmith.merge(cfg, out, quiet=True)
    return load_file(str(out / "model.safetensors"))


@pytest.mark.parametrize(
    ("method", "normalize", "params"),
    [
        ("task_arithmetic", None, ["weight"]),  # density has no effect there; lambda only scales the weights
        (
            "ties",
            None,
            ["weight", "density", "lambda"],
        ),  # normalized (mergekit-evolve's default): lambda scales
        ("ties", False, ["weight", "density"]),
        ("slerp", None, ["t"]),
    ],
)
def test_searched_parameters_follow_the_method(models, method, normalize, params):
    from mergesmith.search.genome import SearchSpace

    cfg = genome_config(models)
    cfg["genome"].update(merge_method=method, filters=["mlp"])
    if normalize is not None:
        cfg["genome"]["normalize"] = normalize
    space = SearchSpace(parse_search_config(cfg), 4)
    per_model = {"weight", "density"}
    assert sorted({lab.split(".")[-3] for lab in space.labels()}) == sorted(params)
    expected = sum((2 if p in per_model else 1) * 2 * 2 for p in params)  # models x groups x blocks
    assert space.dim == expected
    config = space.to_config(space.clip(space.x0))
    if "lambda" in params:
        assert config["parameters"]["lambda"] == [{"filter": "mlp", "value": [1.0] * 4}, {"value": [1.0] * 4}]
        assert config["parameters"]["normalize"] is True


# --- config errors: one line, exit 2, nothing written ----------------------------------------------------


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda c: c["genome"].update(merge_methd="ties"), "unknown key; did you mean 'merge_method'?"),
        (lambda c: c.update(optimiser={"name": "cmaes"}), "unknown key; did you mean 'optimizer'?"),
        (lambda c: c["tasks"][0].update(limt=3), "'tasks.0.limt': unknown key; did you mean 'limit'?"),
        (
            lambda c: c["tasks"][0].update(limit=True),
            "at 'tasks.0.limit': expected a whole number, not true/false",
        ),
        (lambda c: c["optimizer"].update(bounds={"density": [0.1, 2]}), "must lie within (0, 1]"),
        (lambda c: c["optimizer"].update(bounds={"density": [0, 1]}), "a density of 0 keeps nothing"),
        (lambda c: c["optimizer"].update(name="nelder"), "optimizer.name"),
        (lambda c: c["optimizer"].update(init={"wieght": 1.0}), "did you mean 'weight'?"),
        (lambda c: c["optimizer"].update(init={"weight": 3.0}), "outside its range [0.0, 1.0]"),
        (lambda c: c["tasks"][0].update(tasks_file="/nonexistent/val.jsonl"), "does not exist"),
        (lambda c: c["tasks"][0].update(tasks_file=str(Path.cwd())), "is a folder, not a file"),
        (lambda c: c["genome"].update(layer_granularity=3), "does not divide the model's 4 layers"),
        (lambda c: c["genome"].update(merge_method="tiez"), "tiez"),
        (lambda c: c["genome"].update(merge_method="passthrough"), "none of the searched parameters"),
        (lambda c: c.update(held_out=["/nonexistent/test.jsonl"]), "held_out"),
        (lambda c: c["genome"].update(models=[]), "genome.models"),
        (
            lambda c: c["tasks"][0].update(weight=float("nan")),
            "'tasks.0.weight': Input should be a finite number",
        ),
        (
            lambda c: c["optimizer"].update(sigma0=float("inf")),
            "'optimizer.sigma0': Input should be a finite",
        ),
        (
            lambda c: c["optimizer"].update(population=10**12),
            "'optimizer.population': Input should be less than",
        ),
        (lambda c: c["optimizer"].update(population=3), "CMA-ES needs a population of at least 4, got 3"),
        (lambda c: c["tasks"][0].update(name=""), "'tasks.0.name'"),
        (lambda c: c["genome"].update(filters=["mpl"]), "genome.filters: 'mpl' matches no tensor"),
        (lambda c: c.update(num_fewshot=-1), "'num_fewshot'"),
        (
            lambda c: c["optimizer"].update(bounds={"weight": [0, float("inf")]}),
            "Input should be a finite number",
        ),
        (
            lambda c: c["tasks"].append({"name": "arc_easy", "metric": "answer_prob"}),
            "metric answer_prob scores a tasks_file; this task has none",
        ),
        (
            lambda c: c["tasks"][0].update(metric="acc,none"),
            "a tasks_file's metric is one of exact_match, answer_prob",
        ),
    ],
)
def test_config_errors_are_one_line_and_write_nothing(models, tmp_path, capsys, change, message):
    cfg = genome_config(models)
    change(cfg)
    path = tmp_path / "search.yml"
    path.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "out"
    assert main(["search", str(path), str(out), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and message in err, err
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["search.yml"]


def test_missing_optional_packages_name_the_extra(models, tmp_path, capsys, monkeypatch):
    path = tmp_path / "search.yml"
    path.write_text(yaml.safe_dump(genome_config(models)))
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    assert main(["search", str(path), str(tmp_path / "out"), "--ray", "-q"]) == 2
    err = capsys.readouterr().err
    assert "--ray needs the 'ray' package" in err and "pip install 'mergesmith[search]'" in err
    monkeypatch.setitem(sys.modules, "optuna", None)
    cfg = genome_config(models, optimizer={"name": "tpe"})
    path.write_text(yaml.safe_dump(cfg))
    assert main(["search", str(path), str(tmp_path / "out"), "-q"]) == 2
    assert "optimizer tpe needs the 'optuna' package" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "lm_eval", None)
    cfg = genome_config(models)
    cfg["tasks"] = [{"name": "arc_easy", "metric": "acc,none"}]
    path.write_text(yaml.safe_dump(cfg))
    assert main(["search", str(path), str(tmp_path / "out"), "-q"]) == 2
    assert "lm-eval task" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_out_dir_with_other_files_or_another_search_is_refused(models, distance, tmp_path):
    from mergesmith.core.errors import MergeError

    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    with pytest.raises(MergeError, match="not empty"):
        run_search(models, busy, distance, max_evals=8)
    assert sorted(p.name for p in busy.iterdir()) == ["notes.txt"]
    out = tmp_path / "out"
    run_search(models, out, distance, max_evals=8)
    with pytest.raises(MergeError, match="another seed"):
        run_search(models, out, distance, max_evals=8, seed=1)
    with pytest.raises(MergeError, match="no search journal"):
        run_search(models, tmp_path / "new", distance, max_evals=8, resume=True)


# --- the search itself ------------------------------------------------------------------------------------


def test_closed_form_fitness_converges_to_the_known_optimum(models, distance, tmp_path):
    result = run_search(models, tmp_path / "out", distance, max_evals=400)
    found = dict(zip(result.labels, result.best.x, strict=True))
    expected = {f"{m}.weight.rest.{b}": TARGET[m][b] for m in TARGET for b in range(2)}
    assert set(found) == set(expected)
    for label, value in expected.items():
        assert found[label] == pytest.approx(value, abs=0.03), (label, found)
    first = result.candidates[0].fitness
    assert result.best.fitness > 0.999 * 0 + first / 1000  # a thousandth of the first candidate's distance
    assert result.best.fitness == max(c.fitness for c in result.candidates)


def test_resume_after_interrupts_equals_an_uninterrupted_run(models, distance, tmp_path):
    whole = run_search(models, tmp_path / "whole", distance)

    class Flaky:  # raises once, in the middle of generation 2 (the 20th candidate merged)
        def __init__(self):
            self.calls = 0

        def __call__(self, tensors):
            self.calls += 1
            if self.calls == 20:
                raise KeyboardInterrupt
            return distance(tensors)

    def stop_after_first(g: int) -> None:
        if g == 0:
            raise KeyboardInterrupt

    out = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        run_search(models, out, distance, on_generation=stop_after_first)  # between generations
    with pytest.raises(KeyboardInterrupt):
        run_search(models, out, Flaky())  # inside a generation
    lines = (out / "journal" / "evals.jsonl").read_text().splitlines()
    assert 8 < len(lines) < 48
    with open(out / "journal" / "evals.jsonl", "a") as f:  # a line torn by kill -9
        f.write('{"gen": 2, "x": [0.1')
    resumed = run_search(models, out, distance, resume=True)
    assert summary_of(resumed) == summary_of(whole)
    assert (out / "best.yml").read_text() == (tmp_path / "whole" / "best.yml").read_text()
    again = run_search(models, out, distance)  # rerunning a finished search: the same result, nothing merged
    assert summary_of(again) == summary_of(whole)


# a fitness written once, run both in a subprocess that is killed and in this process
FITNESS_SOURCE = """
import time
import numpy as np

def fitness(tensors):
    time.sleep(0.05)  # slow enough for the kill to land inside the search
    return -sum(abs(float(np.mean(np.asarray(v, np.float64))) - 0.01) for v in tensors.values())
"""


def test_resume_after_kill_9_equals_an_uninterrupted_run(models, tmp_path):
    import os
    import signal
    import subprocess
    import time

    namespace: dict = {}
    exec(FITNESS_SOURCE, namespace)
    cfg_path = tmp_path / "search.yml"
    cfg_path.write_text(yaml.safe_dump(genome_config(models)))
    whole = search(
        cfg_path,
        tmp_path / "whole",
        max_evals=40,
        quiet=True,
        write_model=False,
        score_fn=namespace["fitness"],
    )
    out = tmp_path / "killed"
    script = FITNESS_SOURCE + (
        "from mergesmith.search import search\n"
        f"search({str(cfg_path)!r}, {str(out)!r}, max_evals=40, quiet=True, write_model=False, score_fn=fitness)\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-c", script], env=env)
    evals = out / "journal" / "evals.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if evals.is_file() and len(evals.read_text().splitlines()) >= 13:  # inside the second generation
            break
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    before = len([line for line in evals.read_text().splitlines() if line.endswith("}")])
    assert 13 <= before < 40
    calls = []

    def counted(tensors):
        calls.append(1)
        return namespace["fitness"](tensors)

    resumed = search(cfg_path, out, max_evals=40, quiet=True, write_model=False, score_fn=counted)
    assert summary_of(resumed) == summary_of(whole)
    merged = {c.x for c in whole.candidates}
    # only what the killed run had not journalled is merged again, and the baseline, scored at the end
    assert len(calls) == len(merged) - before + 1


def test_workers_give_the_same_candidates_and_best(models, distance, tmp_path):
    serial = run_search(models, tmp_path / "serial", distance, max_evals=24)
    parallel = run_search(models, tmp_path / "parallel", distance, max_evals=24, workers=2)
    assert summary_of(parallel) == summary_of(serial)
    assert (tmp_path / "parallel" / "best.yml").read_text() == (tmp_path / "serial" / "best.yml").read_text()


def test_best_yml_remerges_to_the_scored_bytes_and_score(tmp_path):
    """On the shipped skill models, scored for real: `mergesmith merge best.yml` writes exactly the tensors
    the search scored, and scoring that folder gives the journalled score."""
    from mergesmith.eval import evaluate_tasks
    from mergesmith.eval.tasks import load_tasks

    data = {s: SKILLS / "data" / s / "val.jsonl" for s in ("rev", "sort")}
    cfg = {
        "genome": skills_genome("ties", 1, filters=["mlp"]),
        "tasks": [{"name": s, "tasks_file": str(p)} for s, p in data.items()],
        "limit": 6,
        "optimizer": {"population": 4, "init": {"weight": 1.0, "density": 0.5}},
    }
    path = tmp_path / "search.yml"
    path.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "out"
    assert main(["search", str(path), str(out), "--max-evals", "8", "--quiet"]) == 0
    result = json.loads((out / "summary.json").read_text())
    remerged = tmp_path / "remerged"
    assert main(["merge", str(out / "best.yml"), str(remerged), "--quiet"]) == 0
    merger = Merger()
    _, scored = merger.merge(yaml.safe_load((out / "best.yml").read_text()))
    merger.close()
    files = load_file(str(remerged / "model.safetensors"))
    assert set(files) == set(scored)
    for name, array in scored.items():
        assert files[name].dtype == array.dtype and files[name].tobytes() == array.tobytes(), name
    assert (out / "model" / "model.safetensors").read_bytes() == (remerged / "model.safetensors").read_bytes()
    # best.yml holds one value per layer and model for the mlp filter and for the rest
    best = yaml.safe_load((out / "best.yml").read_text())
    weight = best["models"][0]["parameters"]["weight"]
    assert [e.get("filter") for e in weight] == ["mlp", None] and len(weight[0]["value"]) == 3
    # re-scoring the written model gives the journalled score
    for skill, p in data.items():
        task = load_tasks(p)
        task = type(task)(task.name, task.path, task.prompts[:6], task.answers[:6])
        score = evaluate_tasks(remerged, task)[task.name]
        assert score == result["best"]["scores"][skill]
    header = (out / "candidates.csv").read_text().splitlines()[0].split(",")
    assert header[:3] == ["evaluation", "generation", "fitness"] and "rev.weight.mlp.0" in header
    assert (out / "search.png").stat().st_size > 0
    shutil.rmtree(remerged)


def test_ray_before_the_positionals_or_unreachable_is_one_line(models, tmp_path, capsys, monkeypatch):
    """A bare --ray before SEARCH.yml took the config as its address (the error was a missing OUT_DIR);
    a Ray that cannot be reached was a ConnectionError traceback."""
    import types

    path = tmp_path / "search.yml"
    path.write_text(yaml.safe_dump(genome_config(models)))
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_:
        main(["search", "--ray", str(path), str(out)])
    assert exit_.value.code == 2 and "not a Ray address" in capsys.readouterr().err

    def refuse(**kwargs):
        raise ConnectionError("ray client connection timeout")

    fake = types.SimpleNamespace(is_initialized=lambda: False, init=refuse)
    monkeypatch.setitem(sys.modules, "ray", fake)
    assert main(["search", str(path), str(out), "--ray", "ray://nowhere:10001", "-q"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "'ray://nowhere:10001'" in err and "ConnectionError" in err, err


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("merge_method: [\n", "not valid YAML"),  # was a yaml ParserError traceback
        ("merge_method: linear\n", "invalid config"),  # named 'config:', not the file
    ],
)
def test_bad_baseline_is_one_line_naming_the_file(models, tmp_path, capsys, text, message):
    baseline = tmp_path / "hand.yml"
    baseline.write_text(text)
    cfg = genome_config(models)
    cfg["baseline"] = str(baseline)
    path = tmp_path / "search.yml"
    path.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "out"
    assert main(["search", str(path), str(out), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and message in err and str(baseline) in err, err
    assert not out.exists()


def test_a_hand_edited_journal_is_refused_or_reevaluated(models, distance, tmp_path):
    """A header.json that is JSON but not an object was an AttributeError traceback; an evals.jsonl line
    that is JSON but not a record was a TypeError: now the first is refused, the second evaluated again."""
    from mergesmith.core.errors import MergeError

    whole = run_search(models, tmp_path / "whole", distance, max_evals=16)
    out = tmp_path / "edited"
    shutil.copytree(tmp_path / "whole", out)
    evals = out / "journal" / "evals.jsonl"
    lines = evals.read_text().splitlines()
    evals.write_text("\n".join([lines[0], '{"x": 1}', "[2]", *lines[1:]]) + "\n")
    again = run_search(models, out, distance, max_evals=16)
    assert again.best.fitness == whole.best.fitness
    (out / "journal" / "header.json").write_text("[]")
    with pytest.raises(MergeError, match="not a journal header"):
        run_search(models, out, distance, max_evals=16)


def test_answer_prob_fitness_is_the_written_models_answer_probability(tmp_path):
    """`metric: answer_prob` scores a tasks_file by the teacher-forced probability of its answers: the
    journalled score of the best recipe is that of the model the search writes."""
    from mergesmith.eval.loading import load_model
    from mergesmith.eval.tasks import TaskSet, load_tasks, score_answer_prob

    data = {s: SKILLS / "data" / s / "val.jsonl" for s in ("rev", "sort")}
    cfg = {
        "genome": skills_genome("task_arithmetic", 3),
        "tasks": [{"name": s, "tasks_file": str(p), "metric": "answer_prob"} for s, p in data.items()],
        "limit": 8,
        "optimizer": {"population": 4, "init": {"weight": 1.0}},
    }
    path = tmp_path / "search.yml"
    path.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "out"
    assert main(["search", str(path), str(out), "--max-evals", "4", "--quiet"]) == 0
    best = json.loads((out / "summary.json").read_text())["best"]["scores"]
    model, tokenizer = load_model(out / "model")
    for skill, p in data.items():
        task = load_tasks(p)
        task = TaskSet(task.name, task.path, task.prompts[:8], task.answers[:8])
        assert best[skill] == pytest.approx(score_answer_prob(model, tokenizer, task), rel=1e-5)
        assert 0 < best[skill] < 1 and best[skill] not in {
            k / 8 for k in range(9)
        }  # not an exact-match share


@pytest.mark.parametrize("seed", ["-1", "4294967296", "1e3"])
def test_a_seed_the_optimisers_cannot_take_is_one_line(models, tmp_path, capsys, seed):
    """numpy, cmaes and optuna take seeds from 0 to 2**32 - 1; others were a traceback after the
    journal's header was written (so that a rerun with a good seed was refused too)."""
    path = tmp_path / "search.yml"
    path.write_text(yaml.safe_dump(genome_config(models)))
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_:
        main(["search", str(path), str(out), "--seed", seed, "-q"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "from 0 to 4294967295" in err and err.count("\n") == 1, err
    assert not out.exists()
    with pytest.raises(MergeError, match="--seed must be a whole number from 0"):
        search(path, out, seed=-1, score_fn=lambda tensors: 0.0)
    assert not out.exists()


@pytest.mark.parametrize("answer", ["二", "ab\ncd"])
def test_an_answer_no_prediction_can_match_is_refused_before_anything_is_written(tmp_path, capsys, answer):
    """answer_prob gave such answers a probability (of <unk>, or of a newline, where predictions are cut),
    though exact match can never score them; a tokenizer problem surfaced only at the first evaluation,
    after the journal was written."""
    tasks = tmp_path / "t.jsonl"
    tasks.write_text(
        json.dumps({"prompt": "rev: abc=", "answer": "cba"})
        + "\n"
        + json.dumps({"prompt": "rev: xy=", "answer": answer})
        + "\n"
    )
    cfg = {
        "genome": skills_genome("task_arithmetic", 3),
        "tasks": [{"name": "t", "tasks_file": str(tasks), "metric": "answer_prob"}],
    }
    path = tmp_path / "search.yml"
    path.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "out"
    assert main(["search", str(path), str(out), "--max-evals", "2", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{tasks}, line 2" in err and "no answer can match it" in err, err
    assert not out.exists()
