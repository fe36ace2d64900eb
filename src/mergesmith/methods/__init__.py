"""Merge methods: a registry from config name to a Method, and the kernel protocol they follow.

A method's maths is a pure function of tensors and numbers. To merge tensors larger than memory allows,
each method is written as a small *kernel* that sees its inputs in row chunks: methods that need a
global statistic of a tensor (a magnitude threshold, a norm, a cosine) declare ``passes`` and gather it
in ``observe`` before ``apply`` computes each output chunk. A tensor that fits is one chunk, so the same
code serves both cases, and ``merge_tensors`` runs any method on whole in-memory tensors.

The protocol and the registry are in base.py, which every method module imports; this module reads the
registry, after importing every method module (each registers itself).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from mergesmith.core._torch import torch
from mergesmith.core.errors import MergeError
from mergesmith.methods.base import (
    FRACTION,
    NON_NEGATIVE,
    POSITIVE,
    REGISTRY,
    REQUIRED,
    BaseRule,
    Chunk,
    Domain,
    Kernel,
    KernelFactory,
    Method,
    ParamSpec,
    check_domain,
    fill_defaults,
    merge_whole,
    register,
    run_kernel,
)

__all__ = [
    "FRACTION",
    "NON_NEGATIVE",
    "POSITIVE",
    "REQUIRED",
    "BaseRule",
    "Chunk",
    "Domain",
    "Kernel",
    "KernelFactory",
    "Method",
    "ParamSpec",
    "all_parameter_names",
    "check_domain",
    "fill_defaults",
    "get_method",
    "merge_tensors",
    "methods",
    "register",
    "run_kernel",
]


def get_method(name: str) -> Method:
    _load_all()
    try:
        return REGISTRY[name]
    except KeyError:
        known = ", ".join(sorted(REGISTRY))
        raise MergeError(f"unknown merge_method {name!r}; known methods: {known}") from None


def methods() -> dict[str, Method]:
    _load_all()
    return dict(REGISTRY)


def all_parameter_names() -> set[str]:
    """Every parameter name that some merge method takes."""
    return {name for m in methods().values() for name in m.param_index}


_loaded = False


def _load_all() -> None:
    """Import every method module (each registers itself); once, as workers ask for every tensor."""
    global _loaded
    if _loaded:
        return
    from mergesmith.methods import (  # noqa: F401
        arcee_fusion,
        breadcrumbs,
        della,
        isotropic,
        linear,
        model_stock,
        nearswap,
        nuslerp,
        passthrough,
        ram,
        sce,
        slerp,
        spherical,
        task_arithmetic,
        tsv,
    )

    _loaded = True


def merge_tensors(
    method: str,
    tensors: Sequence[torch.Tensor],
    base: torch.Tensor | None = None,
    *,
    seed: int = 0,
    name: str = "tensor",
    **params: Any,
) -> torch.Tensor:
    """Merge whole in-memory tensors with a registered method; per-model parameters are sequences.

    Inputs are computed in float32 (float64 stays float64) and the result keeps that dtype.
    """
    return merge_whole(get_method(method), tensors, base, seed=seed, name=name, **params)
