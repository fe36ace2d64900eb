"""``mergesmith merge`` and ``mergesmith plan``."""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING

from mergesmith.core.cliargs import (
    add_device,
    add_output_folder,
    add_verbosity,
    add_workers,
    options_from_args,
)
from mergesmith.core.defaults import DEFAULT_SHARD_SIZE, OUT_FORMATS

if TYPE_CHECKING:
    from mergesmith.pipeline.execute import ExecOptions
    from mergesmith.pipeline.plan import MergePlan

# torch and the engine are imported inside the handlers, so that `--help` stays fast


VERBOSE = "more detail: -v info (backend, budget, per-stage timing)"


def _add_exec_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--memory-limit", metavar="SIZE", help="keep peak memory under SIZE (e.g. 2G, 800M)")
    add_workers(p, "tensors processed")
    add_device(p, "where the maths runs")
    p.add_argument(
        "--random-seed", type=int, default=0, metavar="N", help="seed for DARE's random masks (default 0)"
    )
    p.add_argument(
        "--backend",
        choices=("auto", "native", "torch"),
        default="auto",
        help="auto (default): native (numpy, no torch import) where the method and dtypes allow, else "
        "torch; both give the same bytes",
    )


def _add_plan_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--allow-crimes",
        action="store_true",
        help="merge models of different architectures (model_type / architectures in config.json); a "
        "tensor only some models have is copied from one that has it, with a warning",
    )
    p.add_argument(
        "--strict",
        action="store_true",
        help="make every warning an error (e.g. a parameter the method ignores where it is written)",
    )
    p.add_argument(
        "--mergekit-compat",
        action="store_true",
        help="mergekit's result where a mergesmith extension would change it: ignore the per-model weights "
        "of model_stock, karcher and sce, as mergekit does (docs/config.md)",
    )
    p.add_argument(
        "--per-expert",
        action="store_true",
        help="merge per-expert MoE tensors (experts.N.w1) each on its own: TIES's density and other "
        "whole-tensor statistics per expert, instead of per fused tensor of every expert as mergekit "
        "(docs/config.md)",
    )


def register(sub) -> None:
    p = sub.add_parser(
        "merge",
        help="merge models as a YAML config describes",
        description="Merge models as CONFIG (mergekit's YAML format) describes, into a new model folder OUT_DIR. "
        "A CONFIG with several YAML documents is a multi-stage merge: stages run in dependency order, "
        "intermediate ones into --intermediate-dir, and a stage whose config and inputs are unchanged since "
        "the last run is skipped (docs/config.md).",
    )
    p.add_argument("config", metavar="CONFIG.yml")
    p.add_argument("out_dir", metavar="OUT_DIR")
    add_output_folder(p)
    p.add_argument(
        "--intermediate-dir",
        "-I",
        metavar="DIR",
        help="multi-stage files: where named stages are kept, one folder each (default: OUT_DIR.stages)",
    )
    p.add_argument(
        "--out-shard-size",
        default=DEFAULT_SHARD_SIZE,
        metavar="SIZE",
        help="largest output shard (default 5G; K/M/G)",
    )
    p.add_argument(
        "--out-format",
        choices=OUT_FORMATS,
        default="safetensors",
        help="bitnet: ternarise the merged linear weights of the decoder layers and write them packed "
        "(transformers quant_method bitnet, autobitlinear); default: safetensors",
    )
    _add_exec_options(p)
    _add_plan_options(p)
    add_verbosity(p, "no progress bar or summary", VERBOSE)
    p.add_argument("--no-copy-tokenizer", action="store_true", help="do not copy tokenizer files")
    p.add_argument(
        "--no-model-card", action="store_true", help="do not write README.md and mergesmith_config.yml"
    )
    p.set_defaults(func=run, command="merge")

    q = sub.add_parser(
        "plan",
        help="print the merge plan without writing anything",
        description="Print one line per output tensor (method, resolved parameters, sources) and the estimated "
        "peak memory, without reading tensor data or writing anything.",
    )
    q.add_argument("config", metavar="CONFIG.yml", nargs="?")
    _add_exec_options(q)
    _add_plan_options(q)
    q.add_argument("--json-schema", action="store_true", help="print the config's JSON schema instead")
    q.add_argument(
        "--summary", action="store_true", help="only the summary line (of each stage, for multi-stage files)"
    )
    add_verbosity(q, "only the summary line (as --summary)", VERBOSE)
    q.set_defaults(func=run, command="plan")


def run(args: argparse.Namespace) -> int:
    """``merge`` or ``plan``, as parsed; returns 0. Expected failures raise MergeError."""
    return _merge(args) if args.command == "merge" else _plan(args)


def _merge(args: argparse.Namespace) -> int:
    from mergesmith.pipeline.api import merge_with
    from mergesmith.pipeline.options import MergeOptions

    options = options_from_args(
        MergeOptions, args, copy_tokenizer=not args.no_copy_tokenizer, write_model_card=not args.no_model_card
    )
    merge_with(args.config, args.out_dir, options)
    return 0


def _plan(args: argparse.Namespace) -> int:
    from mergesmith.pipeline.api import make_plan
    from mergesmith.pipeline.config import config_json_schema
    from mergesmith.pipeline.options import MergeOptions
    from mergesmith.pipeline.run import exec_options_for
    from mergesmith.pipeline.stages import is_multi_stage, plan_stages

    if args.json_schema:
        print(json.dumps(config_json_schema(), indent=2))
        return 0
    if not args.config:
        print("mergesmith plan: error: CONFIG.yml is required", file=sys.stderr)
        return 2
    options = exec_options_for(options_from_args(MergeOptions, args))
    # what decides a plan: the same for one merge and for every stage of a multi-stage file
    planning = dict(
        allow_crimes=args.allow_crimes,
        strict=args.strict,
        mergekit_compat=args.mergekit_compat,
        per_expert=args.per_expert,
    )
    if not is_multi_stage(args.config):
        plan = make_plan(args.config, **planning)
        try:
            _print_plan(plan, options, args.summary or args.quiet)
        finally:
            plan.close()
        return 0
    stages = plan_stages(args.config, **planning)
    try:
        for i, sp in enumerate(stages, 1):
            where = "OUT_DIR (final)" if sp.final else f"<intermediate-dir>/{sp.stage.name}"
            print(f"## stage {i}/{len(stages)}: {sp.stage.label} -> {where}")
            _print_plan(sp.plan, options, args.summary or args.quiet)
    finally:
        for sp in stages:
            sp.plan.close()
    return 0


def _print_plan(plan: MergePlan, options: ExecOptions, summary_only: bool) -> None:
    """One line per output tensor (unless ``summary_only``), warnings, and the totals with peak memory."""
    from mergesmith.core.sizes import human_size
    from mergesmith.pipeline.backends import choose_backend
    from mergesmith.pipeline.execute import estimate_peak

    if not summary_only:
        for t in plan.tensors:
            print(t.describe())
    for w in plan.warnings:
        print(f"warning: {w}")
    if plan.vocab is not None:
        print(f"# {plan.vocab.describe()}")
    from mergesmith.pipeline.run import log_choices, settle

    backend, why = choose_backend(plan, options.backend, options.device, transformed_output=False)
    options = settle(plan, options, backend)
    peak = estimate_peak(plan, options, backend)
    log_choices(plan, options, backend, why)
    print(
        f"# {len(plan.tensors)} tensors, {plan.num_layers} layers, {human_size(plan.total_bytes)} of output; "
        f"estimated peak memory {human_size(peak)} with {options.workers} workers; "
        f"{backend} backend" + (f" ({why})" if why else "")
    )
