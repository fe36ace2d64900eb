"""Planning rules for new methods: an optional base model, and parameter checks at plan time."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from mergesmith.core.errors import ConfigError, MergeError
from mergesmith.methods import BaseRule, get_method, merge_tensors
from mergesmith.pipeline.api import merge
from mergesmith.pipeline.config import load_config
from mergesmith.pipeline.plan import build_plan


def _plan(config: dict):
    return build_plan(load_config(config))


def test_optional_base_with_a_base_model_uses_task_vectors(llama_trio):
    base, ft1, ft2 = llama_trio
    assert get_method("nuslerp").base == BaseRule.OPTIONAL
    plan = _plan(
        {
            "merge_method": "nuslerp",
            "base_model": str(base),
            "models": [
                {"model": str(ft1), "parameters": {"weight": 1.0}},
                {"model": str(ft2), "parameters": {"weight": 3.0}},
            ],
        }
    )
    try:
        t = plan.tensors[0]
        assert t.base is not None and t.base.model == str(base)
        assert [s.model for s in t.inputs] == [str(ft1), str(ft2)]
        assert dict(t.params)["weight"] == (1.0, 3.0)
    finally:
        plan.close()


def test_optional_base_without_a_base_model_merges_the_models(llama_trio):
    _, ft1, ft2 = llama_trio
    plan = _plan(
        {
            "merge_method": "nuslerp",
            "models": [
                {"model": str(ft1), "parameters": {"weight": 1.0}},
                {"model": str(ft2), "parameters": {"weight": 1.0}},
            ],
        }
    )
    try:
        assert all(t.base is None and len(t.inputs) == 2 for t in plan.tensors)
    finally:
        plan.close()


def test_optional_base_counts_models_besides_the_base(llama_trio):
    base, ft1, _ = llama_trio
    with pytest.raises(ConfigError, match="at least 2 model"):
        _plan(
            {
                "merge_method": "nuslerp",
                "base_model": str(base),
                "models": [{"model": str(ft1), "parameters": {"weight": 1.0}}],
            }
        )


def test_optional_base_in_slices_must_be_a_source(llama_trio):
    base, ft1, ft2 = llama_trio
    config = {
        "merge_method": "multislerp",
        "base_model": str(base),
        "slices": [{"sources": [{"model": str(ft1)}, {"model": str(ft2)}]}],
        "parameters": {"weight": 1.0},
    }
    with pytest.raises(ConfigError, match="must be one of the slice's sources"):
        _plan(config)


def test_parameter_check_runs_at_plan_time_and_names_the_tensor(llama_trio):
    base, ft1, _ = llama_trio
    config = {
        "merge_method": "della",
        "base_model": str(base),
        "models": [{"model": str(ft1), "parameters": {"weight": 1.0, "density": 0.5, "epsilon": 0.6}}],
    }
    with pytest.raises(ConfigError, match=r"tensor .*: della: density 0.5 and epsilon 0.6"):
        _plan(config)


def test_merge_tensors_checks_parameters():
    with pytest.raises(MergeError, match="strictly between 0 and 1"):
        merge_tensors(
            "della", [torch.ones(2)], base=torch.zeros(2), weight=[1.0], density=[0.9], epsilon=[0.2]
        )


E2E_METHODS = {  # one per kind of kernel: histogram passes, random draws, optional base, Gram, SVD
    "breadcrumbs_ties": {"weight": 1.0, "density": 0.7, "gamma": 0.05},
    "della": {"weight": 1.0, "density": 0.5, "epsilon": 0.1},
    "nuslerp": {"weight": 1.0, "nuslerp_flatten": False, "nuslerp_row_wise": True},
    "karcher": {},
    "sce": {"select_topk": 0.5},
    "iso_cts": {},
}


@pytest.mark.parametrize("method", sorted(E2E_METHODS))
def test_end_to_end_row_chunks_equal_whole_tensor_merges(llama_trio, tmp_path, method, fixed_baseline):
    """A YAML merge with a tiny memory budget (row chunks, two workers) equals merge_tensors per tensor."""
    base, ft1, ft2 = llama_trio
    params = E2E_METHODS[method]
    config = {
        "merge_method": method,
        "base_model": str(base),
        "models": [{"model": str(ft1)}, {"model": str(ft2)}],
        "parameters": params,
    }
    budget = 60_000 if get_method(method).chunkable else 8 * 2**20  # SVD methods take whole tensors
    out = load_file(
        merge(config, tmp_path / "out", quiet=True, memory_limit=fixed_baseline + budget, workers=2)
        / "model.safetensors"
    )
    inputs = [load_file(m / "model.safetensors") for m in (base, ft1, ft2)]
    with_base = method != "karcher"  # karcher takes the base as one more input
    for name, merged in out.items():
        tensors = [x[name] for x in inputs]
        models, b = (tensors[1:], tensors[0]) if with_base else (tensors, None)
        expected = merge_tensors(method, models, base=b, name=name, **params)
        torch.testing.assert_close(merged, expected, atol=2e-6, rtol=1e-5, msg=name)
