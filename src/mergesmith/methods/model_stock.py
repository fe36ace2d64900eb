"""Model Stock (Jang, Yun & Han, ECCV 2024, arXiv:2403.19522): interpolate towards the base by angle.

With N >= 2 fine-tunes and task vectors delta_i = theta_i - theta_base,

    cos = mean over pairs i < j of cos(delta_i, delta_j)    (whole tensor, or per row with filter_wise)
    t   = N cos / (1 + (N - 1) cos)
    out = t * mean_i(theta_i) + (1 - t) * theta_base = theta_base + t * mean_i(delta_i)

Fine-tunes that moved the same way (cos -> 1) give their mean; orthogonal ones (cos -> 0) give the
base. A zero task vector has cosine 0. ``weight`` (default 1 for every model) makes the mean a weighted
mean; mergekit has no weights here. t is not clamped (as in the paper and mergekit); where
1 + (N - 1) cos is 0, t is 0.
"""

from __future__ import annotations

from mergesmith.core._torch import torch
from mergesmith.core.errors import MergeError
from mergesmith.methods.base import BaseRule, Chunk, Kernel, Method, ParamSpec, register
from mergesmith.methods.stats import GramAccumulator, row_gram, unit_gram


def mean_pairwise_cosine(gram: torch.Tensor) -> torch.Tensor:
    """Mean of cos(v_i, v_j) over i < j from Gram matrices [..., N, N]."""
    _, cos = unit_gram(gram)
    n = cos.shape[-1]
    upper = torch.triu_indices(n, n, offset=1)
    return cos[..., upper[0], upper[1]].mean(dim=-1)


def stock_ratio(cos: torch.Tensor, n: int) -> torch.Tensor:
    """t = N cos / (1 + (N - 1) cos), 0 where the denominator vanishes."""
    denom = 1.0 + (n - 1) * cos
    ok = denom.abs() > 1e-12
    return torch.where(ok, n * cos / torch.where(ok, denom, torch.ones_like(denom)), torch.zeros_like(cos))


def normalized_weights(weights, method: str) -> list[float]:
    total = float(sum(weights))
    if abs(total) < 1e-12:
        raise MergeError(f"{method}: the weights {list(weights)} sum to 0; change them")
    return [float(w) / total for w in weights]


class ModelStockKernel(Kernel):
    def __init__(self, params, numel):
        super().__init__(params, numel)
        self.filter_wise = bool(params["filter_wise"])
        self.passes = 0 if self.filter_wise else 1
        self.gram: GramAccumulator | None = None
        self.t: torch.Tensor | None = None

    def observe(self, pass_index: int, chunk: Chunk) -> None:
        if self.gram is None:
            self.gram = GramAccumulator(len(chunk.models))
        self.gram.observe([m - chunk.base for m in chunk.models])

    def end_pass(self, pass_index: int) -> None:
        n = self.gram.gram.shape[0]
        self.t = stock_ratio(mean_pairwise_cosine(self.gram.gram), n)

    def apply(self, chunk: Chunk) -> torch.Tensor:
        weights = normalized_weights(self.p["weight"], "model_stock")
        deltas = [m.sub_(chunk.base) for m in chunk.models]
        if self.filter_wise:
            rows = [d.reshape(-1, d.shape[-1]) if d.dim() else d.reshape(1, 1) for d in deltas]
            t = stock_ratio(mean_pairwise_cosine(row_gram(rows)), len(deltas))
            t = t.to(chunk.base.dtype).reshape(*chunk.base.shape[:-1], 1) if chunk.base.dim() else t[0]
        else:
            t = float(self.t)
        mean = deltas[0].mul_(weights[0])
        for w, d in zip(weights[1:], deltas[1:]):
            mean.add_(d, alpha=w)
        return mean.mul_(t).add_(chunk.base)


register(
    Method(
        name="model_stock",
        kernel=ModelStockKernel,
        params=(
            ParamSpec("filter_wise", per_model=False, default=False, kind=bool, doc="one ratio per row"),
            ParamSpec(
                "weight",
                per_model=True,
                default=1.0,
                doc="weight of each model in the mean",
                extension="mergekit's model_stock takes no weights and averages the models equally",
            ),
        ),
        base=BaseRule.REQUIRED,
        min_models=2,
        scratch=2,
        summary="interpolate between the base and the fine-tunes' mean by their angle",
    )
)
