"""Orthogonal matching pursuit: each target vector as a sparse combination of a dictionary's rows.

Used to give a model a row for a token it lacks: a model that has the token (the donor) expresses the
token's row as ``sum_i w_i * donor[s_i]`` over ``k`` tokens ``s_i`` that both models share; the same
weights applied to the model's own rows of those tokens give its row. Every target is solved at once
(one matrix product per step), with an exact least-squares fit on the atoms chosen so far.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from mergesmith.core._torch import torch

if TYPE_CHECKING:
    import torch as _t

DEFAULT_K = 64
_RTOL = 1e-6  # (float32 inputs) a target whose residual falls below this share of its norm stops taking atoms


def omp(dictionary: _t.Tensor, targets: _t.Tensor, k: int = DEFAULT_K) -> tuple[_t.Tensor, _t.Tensor]:
    """Indices (``[m, k']`` int64, rows of ``dictionary``) and weights (``[m, k']`` float64) such that
    ``targets[j] ~= sum_i weights[j, i] * dictionary[indices[j, i]]``; ``k' = min(k, n, h)``. A target
    whose fit is exact before ``k'`` atoms gets zero weights on the rest (its indices repeat its first)."""
    # the dictionary (a whole vocabulary's rows) is held once, in float32 unless given in float64; the
    # atoms chosen and the fit are float64
    d = dictionary if dictionary.dtype == torch.float64 else dictionary.to(torch.float32)
    y = targets.to(torch.float64)
    n, h = d.shape
    m = y.shape[0]
    k = max(1, min(k, n, h))
    norms = d.norm(dim=1)
    unit = d / norms.clamp_min(1e-30)[:, None]  # a zero row scores 0 and is never chosen
    idx = torch.zeros(m, k, dtype=torch.int64)
    weights = torch.zeros(m, k, dtype=torch.float64)
    residual = y.clone()
    active = y.norm(dim=1) > 0
    scale = y.norm(dim=1)
    taken = torch.zeros(m, n, dtype=torch.bool)
    rows = torch.arange(m)
    for step in range(k):
        if not bool(active.any()):
            break
        corr = (residual.to(d.dtype) @ unit.T).abs()
        corr[taken] = -1.0
        pick = corr.argmax(dim=1)
        # a target that is already fitted keeps repeating its first atom with weight 0
        pick = torch.where(active, pick, idx[:, 0])
        idx[:, step] = pick
        taken[rows[active], pick[active]] = True
        sel = rows[active]
        atoms = d[idx[sel, : step + 1]].to(torch.float64)  # [a, step+1, h]
        sol = torch.linalg.lstsq(atoms.transpose(1, 2), y[sel].unsqueeze(2)).solution.squeeze(2)
        weights[sel, : step + 1] = sol
        residual[sel] = y[sel] - torch.einsum("as,ash->ah", sol, atoms)
        active = active & (residual.norm(dim=1) > _RTOL * scale)
    return idx, weights
