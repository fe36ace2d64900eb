"""MoE models as merge inputs. transformers 5 holds a layer's experts fused (``mlp.experts.gate_up_proj``,
every expert in one tensor); published checkpoints store them per expert (``block_sparse_moe.experts.N.w1``).
The output keeps the input's layout and names, and a whole-tensor statistic (TIES's top-k) is taken over
the fused tensor, as mergekit 0.1.5 takes it (it fuses per-expert inputs as it reads them); ``per_expert``
takes it per stored expert tensor instead. bench/moe_inputs.py compares with mergekit itself."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

import mergesmith
from mergesmith.core.arch import expert_group
from mergesmith.core.errors import MergeError
from mergesmith.core.write import ShardedWriter, TensorSpec
from mergesmith.pipeline.api import make_plan
from mergesmith.pipeline.backends.native import NativeBackend
from mergesmith.pipeline.backends.torch import TorchBackend
from mergesmith.pipeline.execute import ExecOptions, Executor
from tiny_models import make_moe_input

CASES = [("mixtral", False), ("mixtral", True), ("qwen3_moe", False), ("qwen3_moe", True)]
IDS = [f"{f}-{'fused' if fused else 'per-expert'}" for f, fused in CASES]
WEIGHTS, DENSITIES = (0.6, 0.4), (0.5, 0.3)


@pytest.fixture(scope="module")
def trios(tmp_path_factory) -> dict[tuple[str, bool], tuple[Path, Path, Path]]:
    root = tmp_path_factory.mktemp("moe-inputs")
    out = {}
    for family, fused in CASES:
        d = root / f"{family}-{fused}"
        out[family, fused] = tuple(
            make_moe_input(d / name, family, fused=fused, tune=tune)
            for name, tune in (("base", None), ("ft1", 1), ("ft2", 2))
        )
    return out


def _ties(trio) -> dict:
    base, ft1, ft2 = trio
    return {
        "merge_method": "ties",
        "base_model": str(base),
        "dtype": "float32",
        "models": [
            {"model": str(m), "parameters": {"weight": w, "density": d}}
            for m, w, d in zip((ft1, ft2), WEIGHTS, DENSITIES)
        ],
    }


def _tensors(folder: Path) -> dict[str, np.ndarray]:
    return load_file(folder / "model.safetensors")


def _fused(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Per-expert tensors stacked, as transformers 5 fuses them (expert by expert, w1 before w3), under the
    group's name; every other tensor as it is."""
    groups: dict[str, list] = {}
    out = {}
    for name, t in tensors.items():
        found = expert_group(name)
        if found is None:
            out[name] = t
        else:
            groups.setdefault(found[0], []).append((found[1], t))
    for key, parts in groups.items():
        out[key] = np.concatenate([t for _, t in sorted(parts, key=lambda p: p[0])])
    return out


def _ties_reference(base: np.ndarray, models: list[np.ndarray]) -> np.ndarray:
    """TIES (mergekit's defaults: sign election by sum, normalize) with the top-k over the whole array."""
    deltas = []
    for m, density in zip(models, DENSITIES):
        delta = (m - base).astype(np.float64).ravel()
        k = int(density * delta.size)
        keep = np.zeros(delta.size, bool)
        keep[np.argsort(-np.abs(delta), kind="stable")[:k]] = True
        deltas.append(np.where(keep, delta, 0.0).reshape(base.shape))
    weighted = [w * d for w, d in zip(WEIGHTS, deltas)]
    sign = np.sign(sum(weighted))
    agree = [(np.sign(d) == sign) & (d != 0) for d in deltas]
    total = sum(w * a for w, a in zip(WEIGHTS, agree))
    mixed = sum(np.where(a, wd, 0.0) for a, wd in zip(agree, weighted))
    return (base + np.where(total != 0, mixed / np.where(total != 0, total, 1), 0.0)).astype(np.float32)


def _reference(trio, per_stored_expert: bool) -> dict[str, np.ndarray]:
    """The reference TIES result of every expert tensor: trimmed per fused tensor (per-expert tensors
    stacked as transformers fuses them), or per stored tensor."""
    inputs = [_tensors(m) for m in trio]
    if not per_stored_expert:
        inputs = [_fused(t) for t in inputs]
    return {k: _ties_reference(inputs[0][k], [i[k] for i in inputs[1:]]) for k in inputs[0] if "experts" in k}


@pytest.mark.parametrize(("family", "fused"), CASES, ids=IDS)
def test_output_keeps_the_input_layout_and_loads(trios, tmp_path, family, fused):
    """Fused in, fused out; per expert in, per expert out: the same names, shapes and count as the base
    model, and transformers loads the result with no missing or unexpected keys."""
    import transformers

    trio = trios[family, fused]
    out = mergesmith.merge(_ties(trio), tmp_path / "out", quiet=True)
    ours, theirs = _tensors(out), _tensors(trio[0])
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}
    assert any(".experts.0." in k for k in ours) != fused
    model, info = transformers.AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert not info["mismatched_keys"]


@pytest.mark.parametrize(("family", "fused"), CASES, ids=IDS)
def test_ties_trims_per_fused_tensor_by_default(trios, tmp_path, family, fused):
    """The default: TIES's density is a fraction of the fused tensor (every expert of the layer), as
    mergekit takes it, whatever the layout on disk; a per-expert trim gives another result."""
    trio = trios[family, fused]
    out = _fused(_tensors(mergesmith.merge(_ties(trio), tmp_path / "out", quiet=True)))
    ref, per_tensor = _reference(trio, False), _reference(trio, True)
    for name, expected in ref.items():
        np.testing.assert_allclose(out[name], expected, rtol=0, atol=1e-6, err_msg=name)
    if not fused:  # with per-expert inputs, trimming each expert on its own is measurably different
        out_pe = _tensors(tmp_path / "out")
        assert sum(int((np.abs(out_pe[k] - v) > 1e-5).sum()) for k, v in per_tensor.items()) > 0


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_per_expert_option_trims_each_stored_expert(trios, tmp_path, family):
    trio = trios[family, False]
    out = _tensors(mergesmith.merge(_ties(trio), tmp_path / "out", quiet=True, per_expert=True))
    for name, expected in _reference(trio, True).items():
        np.testing.assert_allclose(out[name], expected, rtol=0, atol=1e-6, err_msg=name)
    lines = [t.describe() for t in make_plan(_ties(trio), per_expert=True).tensors]
    assert not any("merged as one" in line for line in lines)


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_both_layouts_give_the_same_bytes(trios, tmp_path, family):
    """A merge of per-expert inputs, stacked, is bit for bit the merge of the same models fused."""
    per_expert = _fused(_tensors(mergesmith.merge(_ties(trios[family, False]), tmp_path / "a", quiet=True)))
    fused = _tensors(mergesmith.merge(_ties(trios[family, True]), tmp_path / "b", quiet=True))
    rename = {"mixtral": {".*.w1+w3.weight": ".gate_up_proj", ".*.w2.weight": ".down_proj"}}.get(family, {})
    rename = rename or {".*.gate_up_proj.weight": ".gate_up_proj", ".*.down_proj.weight": ".down_proj"}
    for name, value in per_expert.items():
        fused_name = name.replace(".block_sparse_moe.", ".mlp.")
        for old, new in rename.items():
            fused_name = fused_name.replace(old, new)
        np.testing.assert_array_equal(value.reshape(fused[fused_name].shape), fused[fused_name], err_msg=name)


@pytest.mark.parametrize("backend", [NativeBackend, TorchBackend])
def test_a_group_merged_in_row_chunks_gives_the_same_bytes(trios, tmp_path, backend):
    """Chunks of a few rows cross from one expert's tensor to the next (reads and writes split there); two
    passes find the threshold; the bytes are those of a merge in one piece."""
    whole = _tensors(mergesmith.merge(_ties(trios["mixtral", False]), tmp_path / "whole", quiet=True))
    plan = make_plan(_ties(trios["mixtral", False]))
    folder = tmp_path / "chunked"
    folder.mkdir()
    try:
        specs = [TensorSpec(t.name, t.out_code, t.shape) for t in plan.tensors]
        seen = []
        with ShardedWriter(folder, specs, 1 << 30) as writer:
            made = backend(plan) if backend is NativeBackend else backend(plan, "cpu")
            Executor(plan, writer, ExecOptions(workers=1, budget=3000), backend=made).run(seen.append)
            writer.finish()
    finally:
        plan.close()
    assert sorted(t.name for t in seen) == sorted(whole)  # the progress counts every tensor written
    chunked = _tensors(folder)
    for name, value in whole.items():
        np.testing.assert_array_equal(chunked[name], value, err_msg=name)


def test_experts_with_parameters_of_their_own_are_merged_on_their_own(trios):
    """A filter that gives one expert another density splits the group: each expert tensor is trimmed on
    its own (the fused tensor has no one density)."""
    cfg = _ties(trios["mixtral", False])
    cfg["models"][0]["parameters"]["density"] = [{"filter": "experts.1.w1", "value": 0.9}, {"value": 0.5}]
    lines = [t.describe().split(" ")[0] for t in make_plan(cfg).tensors if t.group]
    assert lines and all(name.endswith(".w2.weight") for name in lines)  # the w1+w3 groups are split


def test_methods_that_work_per_matrix_merge_each_expert_on_its_own(trios):
    """tsv's SVD is of each expert's matrix, not of a stack of them: no group is formed."""
    base, ft1, ft2 = trios["mixtral", False]
    cfg = {
        "merge_method": "tsv",
        "base_model": str(base),
        "models": [{"model": str(ft1)}, {"model": str(ft2)}],
    }
    plan = make_plan(cfg)
    try:
        assert not any(t.group for t in plan.tensors)
    finally:
        plan.close()
    assert any(t.group for t in make_plan(_ties(trios["mixtral", False])).tensors)


def test_models_with_experts_in_different_layouts_are_a_one_line_error(trios):
    base = trios["mixtral", True][0]
    ft = trios["mixtral", False][1]
    cfg = {"merge_method": "ties", "base_model": str(base), "models": [{"model": str(ft)}]}
    cfg["models"][0]["parameters"] = {"weight": 1.0, "density": 0.5}
    with pytest.raises(MergeError, match="MoE experts in different layouts.*save_pretrained"):
        make_plan(cfg)
