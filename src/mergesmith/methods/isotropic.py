"""Isotropic merging: Iso-C and Iso-CTS (Marczak et al., ICML 2025, "No Task Left Behind", arXiv:2502.04959).

For each matrix, with task vectors Delta_i = theta_i - theta_base (i = 1..T) and r = min(rows, cols):

* iso_c: Delta = sum_i Delta_i = U S V^T; every singular value is replaced by their mean,
  sigma = mean(S), so the merged update has a flat (isotropic) spectrum:

      out = theta_base + alpha * sigma U V^T

* iso_cts adds task-specific directions. The top c singular vectors of Delta span the common subspace,
  c = int(r * common_space_fraction), moved so that s = (r - c) / T is a whole number per task
  (T s = round((r - c) / T) T). Each task's component outside it, Delta_i - U_c U_c^T Delta_i, gives
  its top s singular triplets. The c common and T s task vectors are stacked, U and V are replaced by
  their orthogonal polar factors, and all r singular values by their mean:

      out = theta_base + alpha * mean(S_stacked) U_perp V_perp^T

Tensors that are not matrices take the mean task vector, as in the paper's code:
out = theta_base + alpha * mean_i Delta_i. The paper tunes ``alpha`` on validation data; 1.0 is the
default here (FusionBench's), larger values (about 1.3-1.5) are common.
"""

from __future__ import annotations

from mergesmith.core._torch import torch
from mergesmith.methods.base import BaseRule, Chunk, Domain, Kernel, Method, ParamSpec, register
from mergesmith.methods.tsv import mean_task_vector, polar_factor


def iso_c_delta(deltas: list[torch.Tensor]) -> torch.Tensor:
    total = deltas[0]
    for d in deltas[1:]:
        total.add_(d)
    u, s, vh = torch.linalg.svd(total, full_matrices=False)
    return (u @ vh).mul_(s.mean())


def common_space_size(rank: int, tasks: int, fraction: float) -> tuple[int, int]:
    """(common directions c, directions per task s) with c + tasks * s = rank."""
    common = int(rank * fraction)
    task_total = round((rank - common) / tasks) * tasks
    common = rank - task_total
    return common, task_total // tasks


def iso_cts_delta(deltas: list[torch.Tensor], fraction: float) -> torch.Tensor:
    rank = min(deltas[0].shape)
    common, per_task = common_space_size(rank, len(deltas), fraction)
    total = deltas[0].clone()
    for d in deltas[1:]:
        total.add_(d)
    u, s, vh = torch.linalg.svd(total, full_matrices=False)
    us, ss, vhs = [u[:, :common]], [s[:common]], [vh[:common]]
    if per_task > 0:
        u_c = us[0]
        for d in deltas:
            specific = d - u_c @ (u_c.T @ d)
            u_i, s_i, vh_i = torch.linalg.svd(specific, full_matrices=False)
            us.append(u_i[:, :per_task])
            ss.append(s_i[:per_task])
            vhs.append(vh_i[:per_task])
    u_perp = polar_factor(torch.cat(us, dim=1))
    vh_perp = polar_factor(torch.cat(vhs, dim=0))
    return (u_perp @ vh_perp).mul_(torch.cat(ss).mean())


class IsoCKernel(Kernel):
    def apply(self, chunk: Chunk) -> torch.Tensor:
        alpha = self.p["alpha"]
        if chunk.base.dim() != 2:
            return mean_task_vector(chunk).mul_(alpha).add_(chunk.base)
        deltas = [m.sub_(chunk.base) for m in chunk.models]
        return self.merged(deltas).mul_(alpha).add_(chunk.base)

    def merged(self, deltas: list[torch.Tensor]) -> torch.Tensor:
        return iso_c_delta(deltas)


class IsoCtsKernel(IsoCKernel):
    def merged(self, deltas: list[torch.Tensor]) -> torch.Tensor:
        return iso_cts_delta(deltas, self.p["common_space_fraction"])


ALPHA = ParamSpec("alpha", per_model=False, default=1.0, doc="scale of the merged task matrix")

register(
    Method(
        name="iso_c",
        kernel=IsoCKernel,
        params=(ALPHA,),
        base=BaseRule.REQUIRED,
        chunkable=False,
        scratch=4,
        summary="summed task vectors with a flattened singular spectrum (Iso-C)",
    )
)
register(
    Method(
        name="iso_cts",
        kernel=IsoCtsKernel,
        params=(
            ALPHA,
            ParamSpec(
                "common_space_fraction",
                per_model=False,
                default=0.8,
                doc="fraction of the rank given to the common subspace",
                domain=Domain(0.0, 1.0),
            ),
        ),
        base=BaseRule.REQUIRED,
        chunkable=False,
        scratch=8,
        summary="common and task-specific subspaces with a flat spectrum (Iso-CTS)",
    )
)
