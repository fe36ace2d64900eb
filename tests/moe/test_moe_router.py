"""Router maths on hand-made tensors: formulas, the Ledoit-Wolf shortcut, the temperature fit, LDA."""

from __future__ import annotations

import torch

from mergesmith.moe.router import (
    bias_direction,
    calibrated_router,
    cheap_embed_vector,
    fit_scale,
    ledoit_wolf,
    parallel_pairs,
    prompt_vectors,
    random_router,
    unit,
)


def test_prompt_vectors_are_unit_mean_differences():
    pos = torch.tensor([[[1.0, 0.0]], [[3.0, 0.0]]])  # 2 prompts, 1 layer
    neg = torch.tensor([[[2.0, 2.0]]])
    assert torch.allclose(prompt_vectors(pos, None), torch.tensor([[1.0, 0.0]]))
    assert torch.allclose(prompt_vectors(pos, neg), torch.tensor([[0.0, -1.0]]))


def test_cheap_embed_vector():
    pos, neg = torch.tensor([3.0, 4.0]), torch.tensor([0.0, 10.0])
    assert torch.allclose(cheap_embed_vector(pos, None), torch.tensor([0.6, 0.8]))
    assert torch.allclose(cheap_embed_vector(pos, neg), unit(torch.tensor([0.6, -0.2])))


def test_random_routers():
    a = random_router((4, 64), 0, "x", "random")
    assert torch.equal(a, random_router((4, 64), 0, "x", "random"))
    assert not torch.equal(a, random_router((4, 64), 0, "y", "random"))
    assert 0.7 < a.std() < 1.3
    u = random_router((4, 64), 0, "x", "uniform_random")
    assert u.abs().max() <= 64**-0.5 and u.abs().max() > 0.8 * 64**-0.5


def test_parallel_pairs():
    v = torch.tensor([[1.0, 0.0], [1.0, 0.001], [0.0, 1.0]])
    assert [(e, f) for e, f, _ in parallel_pairs(v)] == [(0, 1)]


def test_ledoit_wolf_matches_its_definition():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(50, 6, generator=g, dtype=torch.float64) * torch.tensor(
        [1, 2, 3, 4, 5, 6.0], dtype=torch.float64
    )
    x = x - x.mean(0)
    cov, alpha = ledoit_wolf(x)
    n, p = x.shape
    s = x.T @ x / n
    mu = s.trace() / p
    delta2 = ((s - mu * torch.eye(p, dtype=s.dtype)) ** 2).sum() / p
    beta2 = sum(((torch.outer(r, r) - s) ** 2).sum() for r in x) / n**2 / p
    want = float(min(beta2, delta2) / delta2)
    assert abs(alpha - want) < 1e-9
    assert torch.allclose(cov, want * mu * torch.eye(p, dtype=s.dtype) + (1 - want) * s)


def test_ledoit_wolf_shrinks_more_with_fewer_samples():
    g = torch.Generator().manual_seed(1)
    scales = torch.linspace(0.5, 3, 32, dtype=torch.float64)
    few = torch.randn(20, 32, generator=g, dtype=torch.float64) * scales
    many = torch.randn(5000, 32, generator=g, dtype=torch.float64) * scales
    assert ledoit_wolf(few - few.mean(0))[1] > 3 * ledoit_wolf(many - many.mean(0))[1]


def test_fit_scale_caps_separable_data_at_the_target():
    logits = torch.tensor([[1.0, -1.0], [-1.0, 1.0]] * 10, dtype=torch.float64)
    labels = torch.tensor([0, 1] * 10)
    s = fit_scale(logits, labels, 0.8)
    assert abs(float(torch.softmax(s * logits, -1).max(-1).values.mean()) - 0.8) < 1e-6


def test_fit_scale_is_the_likelihood_optimum_on_overlapping_data():
    g = torch.Generator().manual_seed(2)
    labels = torch.randint(0, 3, (400,), generator=g)
    logits = torch.randn(400, 3, generator=g, dtype=torch.float64) + 1.5 * torch.nn.functional.one_hot(
        labels, 3
    )
    s = fit_scale(logits, labels, 0.99)

    def nll(scale: float) -> float:
        return float(torch.nn.functional.cross_entropy(scale * logits, labels))

    assert nll(s) <= min(nll(s * 0.9), nll(s * 1.1))
    assert float(torch.softmax(s * logits, -1).max(-1).values.mean()) < 0.99


def _clusters(n: int, seed: int):
    """Router-input-like samples: a large component common to all tokens (as RMSNorm outputs have), small
    expert-specific shifts, and noise that is strong in the directions where the shifts are."""
    g = torch.Generator().manual_seed(seed)
    d = 16
    common = torch.full((d,), 3.0)
    shifts = torch.zeros(3, d)
    shifts[0, 0], shifts[1, 1], shifts[2, 2] = 0.6, 0.6, 0.6
    noise_scale = torch.ones(d) * 0.2
    noise_scale[3] = 4.0  # a loud direction that carries no information
    shifts[:, 3] = torch.tensor([1.0, -1.0, 0.0])  # ... where the class means still differ
    samples = [common + shifts[e] + torch.randn(n, d, generator=g) * noise_scale for e in range(3)]
    return samples


def test_calibrated_router_beats_unit_class_means():
    train, test = _clusters(200, 0), _clusters(200, 1)
    fit = calibrated_router(train, [None] * 3, target_top1=0.9)
    x = torch.cat(test)
    y = torch.arange(3).repeat_interleave(200)
    calibrated = float(((x @ fit.weight.T).argmax(-1) == y).float().mean())
    means = unit(torch.stack([t.mean(0) for t in train]))
    plain = float(((x @ means.T).argmax(-1) == y).float().mean())
    assert calibrated > 0.95 and plain < 0.7, (calibrated, plain)
    assert abs(fit.mean_top1 - 0.9) < 1e-3 and fit.bias_fit < 0.1


def test_bias_direction_projects_samples_to_one():
    train = torch.cat(_clusters(100, 3)).double()
    q = bias_direction(train)
    assert float((train @ q - 1).abs().mean()) < 0.1
