"""Router initialisation maths: pure functions from activations (or seeds) to router weight matrices.

A router is a bias-free linear map W (experts x hidden): the logits of a token whose feed-forward input
is x are z = W x, its routing probabilities softmax(z), and it goes to the top-k experts. Nothing here
reads files or knows about configs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from mergesmith.core.rng import derive_seed

#: Two experts whose prompt vectors have a cosine above this in some layer are reported as not separated.
PARALLEL_COSINE = 0.99


def unit(v: Tensor, dim: int = -1) -> Tensor:
    """v / ||v|| along ``dim`` (zero vectors stay zero)."""
    return v / v.norm(dim=dim, keepdim=True).clamp_min(1e-12)


def prompt_vectors(positive: Tensor, negative: Tensor | None) -> Tensor:
    """mergekit's ``hidden`` rows for one expert: unit(mean_p h(p) - mean_n h(n)), per layer.

    ``positive`` is [P, L, d] (one state per prompt and layer), ``negative`` [N, L, d] or None.
    Returns [L, d].
    """
    v = positive.mean(dim=0)
    if negative is not None and len(negative):
        v = v - negative.mean(dim=0)
    return unit(v)


def cheap_embed_vector(positive_sum: Tensor, negative_sum: Tensor | None) -> Tensor:
    """``cheap_embed``: u = unit(sum of the input embeddings of all positive-prompt tokens); with
    negatives, unit(u - unit(sum over negative-prompt tokens)). The same row serves every layer."""
    v = unit(positive_sum)
    if negative_sum is not None:
        v = unit(v - unit(negative_sum))
    return v


def random_router(shape: tuple[int, ...], seed: int, name: str, mode: str) -> Tensor:
    """Routers meant to be trained afterwards, reproducible from (seed, tensor name).

    random:          W_ij ~ N(0, 1)                      (unscaled, as mergekit)
    uniform_random:  W_ij ~ U(-1/sqrt(d), 1/sqrt(d))     (torch.nn.Linear's default init, d = hidden)
    """
    g = torch.Generator().manual_seed(derive_seed(seed, "router", name))
    if mode == "random":
        return torch.randn(shape, generator=g)
    bound = shape[-1] ** -0.5
    return (torch.rand(shape, generator=g) * 2 - 1) * bound


def parallel_pairs(vectors: Tensor, threshold: float = PARALLEL_COSINE) -> list[tuple[int, int, float]]:
    """Pairs (e, f, cos) of rows of ``vectors`` [E, d] whose cosine exceeds ``threshold``."""
    u = unit(vectors.float())
    cos = u @ u.T
    e, f = torch.triu_indices(len(u), len(u), offset=1)
    return [(int(a), int(b), float(cos[a, b])) for a, b in zip(e, f) if cos[a, b] > threshold]


# --- calibrated: LDA on the router's real input, bias folded into the weights, temperature ---------------


@dataclass(frozen=True)
class CalibratedLayer:
    """One layer's calibrated router and the figures that describe its fit."""

    weight: Tensor  # [E, d]
    scale: float  # the temperature factor s applied to the LDA logits
    shrinkage: float  # covariance shrinkage used
    bias_fit: float  # mean |q.x - 1| over the calibration samples (how well the bias is folded in)
    train_accuracy: float  # fraction of calibration samples whose top-1 expert is their own
    mean_top1: float  # mean top-1 probability on the calibration samples after scaling
    correct: Tensor | None = None  # [N] whether each calibration sample's top-1 expert is its own
    bias_dir: Tensor | None = None  # q: the direction on which every router input projects to about 1
    max_dir: Tensor | None = None  # v: v.x ~ the largest of x's logits (least squares on the samples)


def _shrink(s: Tensor, alpha: float) -> Tensor:
    """alpha mu I + (1 - alpha) S with mu = tr(S)/p, in place of S."""
    mu = s.trace() / s.shape[0]
    s.mul_(1 - alpha).diagonal().add_(alpha * mu)
    return s


def ledoit_wolf(centered: Tensor) -> tuple[Tensor, float]:
    """Covariance of the rows of ``centered`` [n, p], shrunk toward mu*I (Ledoit & Wolf, 2004).

    S = X'X/n, mu = tr(S)/p, delta^2 = ||S - mu I||^2/p, beta^2 = min(delta^2, sum_k ||x_k x_k' - S||^2/(n^2 p)),
    alpha = beta^2/delta^2, Sigma = alpha mu I + (1 - alpha) S. No p x p temporaries:
    ||S - mu I||^2 = ||S||^2 - 2 mu tr(S) + p mu^2 and sum_k ||x_k x_k' - S||^2 = sum_k ||x_k||^4 - n ||S||^2.
    """
    n, p = centered.shape
    s = centered.T @ centered / n
    trace = s.trace()
    mu = trace / p
    frob2 = (s * s).sum()
    delta2 = (frob2 - 2 * mu * trace + p * mu * mu) / p
    beta2 = ((centered.pow(2).sum(1) ** 2).sum() - n * frob2) / (n**2 * p)
    alpha = float((beta2.clamp(min=0) / delta2).clamp(max=1.0)) if delta2 > 0 else 1.0
    return _shrink(s, alpha), alpha


def shrunk_covariance(centered: Tensor, shrinkage: float | None) -> tuple[Tensor, float]:
    """Ledoit-Wolf when ``shrinkage`` is None, else (1 - a) S + a mu I with the given a."""
    if shrinkage is None:
        return ledoit_wolf(centered)
    return _shrink(centered.T @ centered / centered.shape[0], shrinkage), shrinkage


def spd_solve(a: Tensor, b: Tensor) -> Tensor:
    """a^-1 b for a symmetric positive definite a (Cholesky; LU if rounding made a indefinite)."""
    chol, info = torch.linalg.cholesky_ex(a)
    if int(info) == 0:
        return torch.cholesky_solve(b if b.dim() == 2 else b[:, None], chol).reshape(b.shape)
    return torch.linalg.solve(a, b)


def _ridge_gram(samples: Tensor, ridge: float) -> Tensor:
    """X'X + lam I with lam = ridge * tr(X'X)/d: the normal matrix of the ridge problems below."""
    gram = samples.T @ samples
    gram.diagonal().add_(ridge * gram.trace() / gram.shape[0])
    return gram


def least_squares_direction(samples: Tensor, target: Tensor, ridge: float = 1e-3) -> Tensor:
    """v = argmin ||X v - t||^2 + lam ||v||^2 with lam = ridge * tr(X'X)/d."""
    return spd_solve(_ridge_gram(samples, ridge), samples.T @ target)


def bias_direction(samples: Tensor, ridge: float = 1e-3) -> Tensor:
    """q = argmin ||X q - 1||^2 + lam ||q||^2 with lam = ridge * tr(X'X)/d: a direction on which every
    router input projects to about 1, so that adding b_e q to row e acts as a bias b_e.

    It exists because the router input is a normalised (RMSNorm times a learned gain) vector that keeps
    large components common to all tokens."""
    return spd_solve(_ridge_gram(samples, ridge), samples.sum(0))


def _class_means(samples: Sequence[Tensor], negatives: Sequence[Tensor | None]) -> Tensor:
    """The experts' class means, each moved away from its negative prompts' mean (see below)."""
    means = torch.stack([x.mean(0) for x in samples])
    centre = means.mean(0)
    for e, neg in enumerate(negatives):
        if neg is not None and len(neg):
            means[e] = means[e] - (neg.mean(0) - centre)
    return means


def lda_logits_weights(
    samples: Sequence[Tensor], negatives: Sequence[Tensor | None], shrinkage: float | None
) -> tuple[Tensor, Tensor, float]:
    """Linear discriminant analysis with equal priors and a shared, shrunk covariance.

    samples[e]: [n_e, d] router inputs of expert e's prompts. With class means m_e and pooled
    within-class covariance Sigma, the discriminant is z_e(x) = w_e.x + b_e with
    w_e = Sigma^-1 m_e and b_e = -1/2 m_e' Sigma^-1 m_e.
    An expert's negative prompts (mean n_e) move its class mean away from them:
    m_e = mean(samples[e]) - (n_e - c), c = the mean of all experts' positive means.
    Returns (W [E, d], b [E], shrinkage used).
    """
    means = _class_means(samples, negatives)
    centered = torch.cat([x - x.mean(0) for x in samples])
    cov, alpha = shrunk_covariance(centered, shrinkage)
    w = spd_solve(cov, means.T).T
    b = -0.5 * (w * means).sum(1)
    return w, b, alpha


#: Shrinkage values that cross-validation tries besides the Ledoit-Wolf one (0 is floored, see below).
SHRINKAGE_GRID = (0.0, 1e-3, 1e-2, 1e-1)


def cross_validated_shrinkage(
    samples: Sequence[Tensor], negatives: Sequence[Tensor | None], folds: Sequence[Tensor], n_folds: int = 2
) -> float:
    """The covariance shrinkage whose discriminant routes held-out calibration prompts best.

    folds[e] gives each sample of expert e a fold (by prompt, so a prompt's tokens stay together). For
    each fold, LDA is fitted on the other folds at every candidate (Ledoit-Wolf's value and
    ``SHRINKAGE_GRID``) and scored by the held-out tokens' top-1 accuracy, each expert's tokens weighing
    the same. One eigendecomposition per fold serves every candidate. Ties go to the larger shrinkage.
    Why: Ledoit-Wolf targets the covariance's estimation error, not routing, and on router inputs of
    answer tokens the discriminating directions are ones of small variance that shrinkage toward mu*I
    drowns (on the skill models it costs 3-5 points of exact match).
    """
    e_count = len(samples)
    _, lw = ledoit_wolf(torch.cat([x - x.mean(0) for x in samples]))
    candidates = sorted({lw, *SHRINKAGE_GRID}, reverse=True)
    scores = torch.zeros(len(candidates), dtype=torch.float64)
    for k in range(n_folds):
        train = [x[f != k] for x, f in zip(samples, folds)]
        test = [x[f == k] for x, f in zip(samples, folds)]
        if any(len(t) == 0 for t in train) or any(len(t) == 0 for t in test):
            continue
        means = _class_means(train, negatives)
        centered = torch.cat([x - x.mean(0) for x in train])
        s = centered.T @ centered / len(centered)
        evals, evecs = torch.linalg.eigh(s)
        mu = s.trace() / s.shape[0]
        proj_means = means @ evecs  # [E, d] in the eigenbasis
        for c, alpha in enumerate(candidates):
            # alpha = 0 is floored at 1e-6 so that a rank-deficient covariance still has an inverse
            diag = max(alpha, 1e-6) * mu + (1 - max(alpha, 1e-6)) * evals
            w = (proj_means / diag) @ evecs.T
            b = -0.5 * (w * means).sum(1)
            for e, t in enumerate(test):
                scores[c] += float(((t @ w.T + b).argmax(-1) == e).double().mean()) / e_count
    best = int(torch.argmax(scores))  # the first maximum: candidates run from large to small shrinkage
    return max(candidates[best], 1e-6)


def fit_scale(logits: Tensor, labels: Tensor, target_top1: float, iters: int = 60) -> float:
    """The temperature factor s for softmax(s z): the maximum-likelihood s (argmin of the mean of
    -log softmax(s z)_y, convex in s), lowered if needed so that mean_i max softmax(s z_i) <= target_top1.

    The likelihood optimum says how confident the router may be; the cap keeps the softmax from
    becoming one-hot on prompts it separates perfectly (where the optimum is s -> infinity)."""

    def top1(s: float) -> float:
        return float(torch.softmax(s * logits, -1).max(-1).values.mean())

    def nll_slope(s: float) -> float:
        p = torch.softmax(s * logits, -1)
        return float(((p * logits).sum(-1) - logits.gather(1, labels[:, None])[:, 0]).mean())

    hi = 1.0
    while nll_slope(hi) < 0 and top1(hi) < target_top1 and hi < 1e12:
        hi *= 2
    lo = 0.0
    for _ in range(iters):  # bisection on the first condition that stops growth
        mid = (lo + hi) / 2
        if nll_slope(mid) < 0 and top1(mid) < target_top1:
            lo = mid
        else:
            hi = mid
    return lo if lo > 0 else hi


def calibrated_router(
    samples: Sequence[Tensor],
    negatives: Sequence[Tensor | None],
    target_top1: float = 0.97,
    shrinkage: float | None = None,
    folds: Sequence[Tensor] | None = None,
) -> CalibratedLayer:
    """One layer's calibrated router from its real input x (the feed-forward block's input).

    1. LDA on the experts' router-input samples: z_e(x) = w_e.x + b_e (see ``lda_logits_weights``).
    2. The router has no bias, so the bias is folded in along q (``bias_direction``): r_e = w_e + b_e q,
       r_e.x = w_e.x + b_e (q.x) ~ z_e(x).
    3. Temperature: W = s [r_e], with s from ``fit_scale`` on the calibration samples.

    With ``shrinkage`` None and ``folds`` given (a fold per sample, by prompt), the shrinkage is chosen
    by cross-validation (``cross_validated_shrinkage``); without folds it is Ledoit-Wolf's.
    """
    samples = [x.double() for x in samples]
    negatives = [None if n is None else n.double() for n in negatives]
    if shrinkage is None and folds is not None:
        shrinkage = cross_validated_shrinkage(samples, negatives, folds)
    w, b, alpha = lda_logits_weights(samples, negatives, shrinkage)
    everything = torch.cat(samples)
    q = bias_direction(everything)
    rows = w + b[:, None] * q[None, :]
    labels = torch.cat([torch.full((len(x),), e, dtype=torch.long) for e, x in enumerate(samples)])
    logits = everything @ rows.T
    s = fit_scale(logits, labels, target_top1)
    final = s * rows
    probs = torch.softmax(s * logits, -1)
    return CalibratedLayer(
        weight=final.float(),
        scale=s,
        shrinkage=alpha,
        bias_fit=float((everything @ q - 1).abs().mean()),
        train_accuracy=float((logits.argmax(-1) == labels).double().mean()),
        mean_top1=float(probs.max(-1).values.mean()),
        correct=logits.argmax(-1) == labels,
        bias_dir=q.float(),
        max_dir=least_squares_direction(everything, (s * logits).max(-1).values).float(),
    )
