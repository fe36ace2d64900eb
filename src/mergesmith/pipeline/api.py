"""The Python API: ``merge(config, out_dir, **options)`` and ``make_plan(config)``."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from mergesmith.core.errors import MergeError
from mergesmith.pipeline.config import MergeConfig, load_config
from mergesmith.pipeline.options import MergeOptions
from mergesmith.pipeline.plan import MergePlan, build_plan
from mergesmith.pipeline.run import merge_one
from mergesmith.pipeline.stages import is_multi_stage, run_stages


def make_plan(
    config: str | Path | dict | MergeConfig,
    *,
    allow_crimes: bool = False,
    strict: bool = False,
    mergekit_compat: bool = False,
    per_expert: bool = False,
) -> MergePlan:
    """Parse the config, open the models (headers only) and plan every output tensor.

    ``allow_crimes``: merge models of different architectures (mergekit's --allow-crimes); a tensor only
    some models have is copied from one that has it. ``strict``: every warning (``plan.warnings``) is an
    error instead. ``mergekit_compat``: mergekit's result where a mergesmith extension of a method would
    change it (model_stock's, karcher's and sce's ``weight``, which mergekit ignores). ``per_expert``:
    per-expert MoE tensors (``experts.N.w1``) merged each on its own; by default the experts of a layer are
    merged as the one fused tensor that transformers 5 and mergekit make of them (docs/config.md).
    """
    return build_plan(
        load_config(config),
        allow_crimes=allow_crimes,
        strict=strict,
        mergekit_compat=mergekit_compat,
        per_expert=per_expert,
    )


def merge(
    config: str | Path | dict | MergeConfig | list[dict],
    out_dir: str | Path,
    *,
    before_commit: Callable[[Path], None] | None = None,
    **options: Any,
) -> Path:
    """Merge the models that ``config`` describes into a new model folder ``out_dir``; returns its path.

    Nothing is written to ``out_dir`` unless the whole merge succeeds, and only one run writes it at a
    time. ``overwrite`` replaces an existing ``out_dir`` that holds a model (never the current folder, a
    parent of it or an input); ``force`` as well replaces one that does not (see
    :class:`mergesmith.core.write.OutputFolder`). A config with several YAML
    documents (or a list of dicts) is a multi-stage merge (see :mod:`mergesmith.pipeline.stages`); its intermediate
    stages go to ``intermediate_dir`` (default ``OUT_DIR.stages`` beside ``out_dir``), which a single merge
    ignores. ``before_commit`` is called with the finished temporary folder just before it is renamed to
    ``out_dir``, to add files that must only exist in a complete output (a stage's marker).
    ``backend``: "auto" (native where it can run the merge, else torch), "native" or "torch" (see
    :mod:`mergesmith.pipeline.backends.native`; both give the same bytes). ``out_format="bitnet"`` ternarises the merged linear weights of the decoder layers and writes them
    packed, as transformers' ``quant_method: bitnet`` checkpoints hold them (see docs/bitnet.md).
    ``allow_crimes``: merge models of different architectures (see :func:`make_plan`); ``strict``: every
    warning of the plan is an error; ``mergekit_compat``: see :func:`make_plan`. Warnings are logged (logger ``mergesmith``) before the merge starts.
    """
    return merge_with(config, out_dir, MergeOptions(**options), before_commit)


def merge_with(
    config: str | Path | dict | MergeConfig | list[dict],
    out_dir: str | Path,
    options: MergeOptions,
    before_commit: Callable[[Path], None] | None = None,
) -> Path:
    """:func:`merge` with its options as one object (what ``mergesmith merge`` builds from its flags)."""
    options.check()
    if is_multi_stage(config):
        if options.out_format != "safetensors":
            raise MergeError(
                f"--out-format {options.out_format} is not supported for multi-stage files yet; merge the "
                "last stage on its own with it"
            )
        return run_stages(config, out_dir, options)
    return merge_one(config, out_dir, options, before_commit)
