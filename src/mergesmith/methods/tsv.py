"""TSV-Merge (Task Singular Vectors; Gargiulo et al., CVPR 2025, arXiv:2412.00081).

For each matrix, with task vectors Delta_i = theta_i - theta_base (i = 1..T) and r = min(rows, cols):

    Delta_i = U_i S_i V_i^T                    (SVD), keep the top k singular triplets of each task,
                                               k = ``k`` or floor(r / T) (at least 1, at most r)
    U = [U_1,k ... U_T,k],  S = diag(S_1,k ... S_T,k),  V = [V_1,k ... V_T,k]
    U_perp = P Q^T where U = P D Q^T           (polar factor: the nearest matrix with orthonormal
    V_perp likewise                             columns, which decorrelates the tasks' directions)
    out = theta_base + alpha * U_perp S V_perp^T

With one task and k = r the result is the task vector itself; tasks whose singular subspaces are already
orthogonal are simply summed. Tensors that are not matrices take the mean task vector, as in the
paper's code: out = theta_base + alpha * mean_i Delta_i. ``alpha`` = 1 is the paper's choice (no
tuning). Needs each whole matrix (not chunked), and an SVD per task per matrix.
"""

from __future__ import annotations

from mergesmith.core._torch import torch
from mergesmith.methods.base import BaseRule, Chunk, Domain, Kernel, Method, ParamSpec, register


def polar_factor(m: torch.Tensor) -> torch.Tensor:
    """The orthogonal polar factor P Q^T of m = P D Q^T (thin SVD)."""
    p, _, qh = torch.linalg.svd(m, full_matrices=False)
    return p @ qh


def mean_task_vector(chunk: Chunk) -> torch.Tensor:
    out = chunk.models[0].sub_(chunk.base)
    for m in chunk.models[1:]:
        out.add_(m.sub_(chunk.base))
    return out.div_(len(chunk.models))


def tsv_delta(deltas: list[torch.Tensor], k: int | None) -> torch.Tensor:
    """U_perp S V_perp^T from each task's top-k singular triplets."""
    rank = min(deltas[0].shape)
    per_task = max(1, min(rank, k if k else rank // len(deltas)))
    us, ss, vhs = [], [], []
    for d in deltas:
        u, s, vh = torch.linalg.svd(d, full_matrices=False)
        us.append(u[:, :per_task])
        ss.append(s[:per_task])
        vhs.append(vh[:per_task])
    u = polar_factor(torch.cat(us, dim=1))
    vh = polar_factor(torch.cat(vhs, dim=0))
    return (u * torch.cat(ss)) @ vh


class TsvKernel(Kernel):
    def apply(self, chunk: Chunk) -> torch.Tensor:
        alpha = self.p["alpha"]
        if chunk.base.dim() != 2:
            return mean_task_vector(chunk).mul_(alpha).add_(chunk.base)
        deltas = [m.sub_(chunk.base) for m in chunk.models]
        return tsv_delta(deltas, self.p["k"]).mul_(alpha).add_(chunk.base)


register(
    Method(
        name="tsv",
        kernel=TsvKernel,
        params=(
            ParamSpec("alpha", per_model=False, default=1.0, doc="scale of the merged task matrix"),
            ParamSpec(
                "k",
                per_model=False,
                default=None,
                kind=int,
                doc="singular directions kept per task (default: floor(rank / number of models))",
                domain=Domain(1.0),
            ),
        ),
        base=BaseRule.REQUIRED,
        chunkable=False,
        scratch=8,
        summary="per-matrix top singular vectors of each task, decorrelated (TSV-M)",
    )
)
