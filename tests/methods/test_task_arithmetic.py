import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mergesmith.core.rng import RandomStream
from mergesmith.methods import Chunk, get_method, merge_tensors

BASE = torch.tensor([1.0, 1.0, 1.0, 1.0])
FT1 = torch.tensor([2.0, 0.0, 1.5, 1.0])  # delta [ 1, -1, 0.5, 0]
FT2 = torch.tensor([0.0, 0.5, 3.0, 1.2])  # delta [-1, -0.5, 2, 0.2]


def test_task_arithmetic_golden():
    out = merge_tensors("task_arithmetic", [FT1, FT2], BASE, weight=[1.0, 0.5], **{"lambda": 2.0})
    # base + 2 * (1*d1 + 0.5*d2) = 1 + 2*[0.5, -1.25, 1.5, 0.1]
    assert torch.allclose(out, torch.tensor([2.0, -1.5, 4.0, 1.2]))


def test_task_arithmetic_normalize_divides_by_weight_sum():
    out = merge_tensors("task_arithmetic", [FT1, FT2], BASE, weight=[1.0, 0.5], normalize=True)
    assert torch.allclose(out, BASE + torch.tensor([0.5, -1.25, 1.5, 0.1]) / 1.5)


def test_task_arithmetic_lambda_zero_gives_base():
    out = merge_tensors("task_arithmetic", [FT1, FT2], BASE, weight=[1.0, 1.0], **{"lambda": 0.0})
    assert torch.equal(out, BASE)


def test_ties_golden():
    # densities 0.5 keep the 2 largest |delta| of each: d1 -> [1, -1, 0, 0], d2 -> [-1, 0, 2, 0]
    # weights 1 and 0.5: weighted [1, -1, 0, 0] and [-0.5, 0, 1, 0]; sums [0.5, -1, 1, 0]
    # elected signs + - + + ; agreeing: elem0 only model 1 -> 1/1; elem1 model 1 -> -1/1;
    # elem2 model 2 -> 1/0.5 = 2; elem3 nobody -> 0
    out = merge_tensors("ties", [FT1, FT2], BASE, weight=[1.0, 0.5], density=[0.5, 0.5])
    assert torch.allclose(out, torch.tensor([2.0, 0.0, 3.0, 1.0]))
    plain = merge_tensors("ties", [FT1, FT2], BASE, weight=[1.0, 0.5], density=[0.5, 0.5], normalize=False)
    assert torch.allclose(plain, torch.tensor([2.0, 0.0, 2.0, 1.0]))


def test_ties_density_one_single_model_lambda_one_is_the_finetune():
    base, ft = torch.randn(8, 8), torch.randn(8, 8)
    out = merge_tensors("ties", [ft], base, weight=[0.7], density=[1.0])
    assert torch.allclose(out, ft, atol=1e-6)


def test_zero_sign_counts_as_positive():
    base = torch.zeros(1)
    out = merge_tensors("ties", [torch.tensor([1.0]), torch.tensor([-1.0])], base, weight=[1.0, 1.0])
    assert out.item() == 1.0  # sum 0 elects "+", only model 1 agrees


@pytest.mark.parametrize("method", ["task_arithmetic", "ties", "dare_linear", "dare_ties"])
def test_identical_models_give_the_model(method):
    base = torch.randn(6, 4)
    ft = base + 0.1 * torch.randn(6, 4)
    out = merge_tensors(method, [ft, ft.clone()], base, weight=[0.5, 0.5], density=[1.0, 1.0], normalize=True)
    assert torch.allclose(out, ft, atol=1e-6)


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
def test_dare_density_one_is_identity(method):
    base, ft = torch.randn(10, 3), torch.randn(10, 3)
    out = merge_tensors(method, [ft], base, weight=[1.0], density=[1.0])
    assert torch.allclose(out, ft, atol=1e-6)


def test_dare_keeps_about_density_and_preserves_l1():
    base = torch.zeros(100_000)
    ft = torch.randn(100_000)
    out = merge_tensors("dare_linear", [ft], base, weight=[1.0], density=[0.3], seed=7, name="w")
    kept = (out != 0).float().mean().item()
    assert abs(kept - 0.3) < 0.01
    assert torch.allclose(out.abs().sum(), ft.abs().sum(), rtol=1e-5)
    kept_values = out[out != 0] / ft[out != 0]
    assert torch.allclose(kept_values, kept_values[0].expand_as(kept_values))  # one rescale factor


def test_dare_mean_of_many_draws_approaches_the_task_vector():
    base = torch.zeros(64)
    ft = torch.linspace(-1, 1, 64)
    draws = torch.stack(
        [
            merge_tensors("dare_linear", [ft], base, weight=[1.0], density=[0.5], rescale=False, seed=s) / 0.5
            for s in range(2000)
        ]
    )
    assert torch.allclose(draws.mean(0), ft, atol=0.08)


def test_dare_is_reproducible_and_seed_dependent():
    base, ft = torch.zeros(1000), torch.randn(1000)
    a = merge_tensors("dare_ties", [ft], base, weight=[1.0], density=[0.5], seed=1, name="x")
    b = merge_tensors("dare_ties", [ft], base, weight=[1.0], density=[0.5], seed=1, name="x")
    c = merge_tensors("dare_ties", [ft], base, weight=[1.0], density=[0.5], seed=2, name="x")
    d = merge_tensors("dare_ties", [ft], base, weight=[1.0], density=[0.5], seed=1, name="y")
    assert torch.equal(a, b) and not torch.equal(a, c) and not torch.equal(a, d)


def _run_chunked(method_name, params, base, models, rows, seed=0):
    method = get_method(method_name)
    kernel = method.kernel(params, base.numel())
    rng = [RandomStream(seed, "t", i) for i in range(len(models))] if method.random else None
    row = base[0].numel()

    def chunks():
        for r in range(0, base.shape[0], rows):
            sl = slice(r, r + rows)
            yield Chunk(base[sl].clone(), [m[sl].clone() for m in models], r * row, rng)

    kernel.observe_all(chunks)
    return torch.cat([kernel.apply(c) for c in chunks()])


@settings(max_examples=20, deadline=None)
@given(
    st.sampled_from(["task_arithmetic", "ties", "dare_linear", "dare_ties", "slerp", "linear"]),
    st.integers(1, 13),
    st.integers(0, 1000),
)
def test_chunked_equals_whole(method_name, rows, seed):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(29, 7, generator=g)
    models = [base + 0.1 * torch.randn(29, 7, generator=g) for _ in range(2)]
    from mergesmith.methods import fill_defaults

    if method_name == "slerp":
        params = fill_defaults(get_method("slerp"), {"t": 0.3}, 1)
        models = models[:1]
    elif method_name == "linear":
        params = fill_defaults(get_method("linear"), {"weight": [0.3, 0.7]}, 2)
    else:
        params = fill_defaults(get_method(method_name), {"weight": [0.6, 0.4], "density": [0.4, 0.7]}, 2)
    if method_name == "linear":
        whole = (
            get_method("linear")
            .kernel(params, base.numel())
            .apply(Chunk(None, [m.clone() for m in models], 0))
        )
        chunked = torch.cat(
            [
                get_method("linear")
                .kernel(params, base.numel())
                .apply(Chunk(None, [m[r : r + rows].clone() for m in models], 0))
                for r in range(0, 29, rows)
            ]
        )
    else:
        whole = _run_chunked(method_name, params, base, models, 29, seed)
        chunked = _run_chunked(method_name, params, base, models, rows, seed)
    assert torch.allclose(whole, chunked, atol=1e-6, rtol=1e-6)
    if method_name in ("ties", "dare_linear", "dare_ties", "task_arithmetic", "linear"):
        assert torch.equal(whole, chunked)


def test_ties_rescale_keeps_each_task_vectors_l1_norm():
    base = torch.zeros(1000)
    ft = torch.randn(1000)
    out = merge_tensors("ties", [ft], base, weight=[1.0], density=[0.3], rescale=True)
    assert int((out != 0).sum()) == 300
    assert torch.allclose(out.abs().sum(), ft.abs().sum(), rtol=1e-5)


@settings(max_examples=15, deadline=None)
@given(st.integers(1, 13), st.integers(0, 1000))
def test_chunked_ties_with_rescale_and_ties_equals_whole(rows, seed):
    from mergesmith.methods import fill_defaults

    g = torch.Generator().manual_seed(seed)
    base = torch.randint(-3, 3, (29, 7), generator=g).float()
    models = [base + torch.randint(-2, 3, (29, 7), generator=g).float() for _ in range(2)]  # many ties
    params = fill_defaults(
        get_method("ties"), {"weight": [0.6, 0.4], "density": [0.4, 0.7], "rescale": True}, 2
    )
    whole = _run_chunked("ties", params, base, models, 29, seed)
    chunked = _run_chunked("ties", params, base, models, rows, seed)
    assert torch.equal(whole, chunked)
    via_whole = merge_tensors("ties", models, base, weight=[0.6, 0.4], density=[0.4, 0.7], rescale=True)
    assert torch.allclose(via_whole, whole, atol=1e-6)
