"""One merge (a single-stage config) from config to committed output folder: :func:`merge_one`, which
``mergesmith.merge`` and every stage of a multi-stage file run with a :class:`MergeOptions`."""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mergesmith.core.cliargs import check_workers
from mergesmith.core.devices import check_device, default_workers
from mergesmith.core.errors import MergeError
from mergesmith.core.model import read_json_file
from mergesmith.core.sizes import human_size, parse_size
from mergesmith.core.vocab import write_union_tokenizer
from mergesmith.core.write import (
    OutputFolder,
    ShardedWriter,
    TensorSpec,
    byte_progress,
    copy_files,
    input_paths,
    write_json,
)
from mergesmith.pipeline.backends import BACKENDS, Backend, choose_backend, make_backend
from mergesmith.pipeline.card import model_card
from mergesmith.pipeline.chat_templates import resolve_chat_template
from mergesmith.pipeline.config import MergeConfig, config_text, load_config
from mergesmith.pipeline.execute import (
    DEFAULT_BUDGET,
    ExecOptions,
    Executor,
    OutputHook,
    baseline_rss,
    estimate_peak,
    settle_budget,
)
from mergesmith.pipeline.options import MergeOptions
from mergesmith.pipeline.plan import MergePlan, build_plan
from mergesmith.pipeline.vocab import rewrite_token_ids, token_refs

if TYPE_CHECKING:
    from mergesmith.pipeline.ternary_output import TernaryOutput

log = logging.getLogger("mergesmith")


def exec_options(
    *,
    memory_limit: str | int | None = None,
    workers: int | None = None,
    device: str = "cpu",
    random_seed: int | None = None,
    backend: str = "auto",
) -> ExecOptions:
    workers = check_workers(workers) or default_workers()
    device = check_device(device)
    limit = None if memory_limit is None else parse_size(memory_limit)
    if limit is not None and limit <= 0:
        raise MergeError(f"--memory-limit {memory_limit} must be positive")
    if backend not in BACKENDS:
        raise MergeError(f"unknown backend {backend!r}; use one of: {', '.join(BACKENDS)}")
    # the budget under a limit is settled once the plan and the backend are known (settle)
    return ExecOptions(
        workers=workers,
        budget=DEFAULT_BUDGET,
        device=device,
        seed=random_seed or 0,
        backend=backend,
        limit=limit,
    )


def exec_options_for(options: MergeOptions) -> ExecOptions:
    """The executor's options of a merge (:func:`exec_options` with the merge's flags)."""
    return exec_options(
        memory_limit=options.memory_limit,
        workers=options.workers,
        device=options.device,
        random_seed=options.random_seed,
        backend=options.backend,
    )


def config_refs(cfg: MergeConfig) -> list[str]:
    """Every model reference a merge config reads (models, slice sources, base models, tokenizer)."""
    refs = [m.model for m in cfg.models or []]
    refs += [s.model for sl in cfg.slices or [] for s in sl.sources]
    refs += [r for r in [cfg.base_model, *(sl.base_model for sl in cfg.slices or [])] if r]
    if cfg.tokenizer_choice not in ("base", "union"):
        refs.append(cfg.tokenizer_choice)
    return refs + token_refs(cfg)


def settle(plan: MergePlan, options: ExecOptions, backend: str) -> ExecOptions:
    """The options a merge runs with: the budget under --memory-limit measured now (call it after the
    backend is made, so that its engine is loaded), workers fitted to it."""
    baseline = baseline_rss(backend)
    options = settle_budget(plan, options, baseline, backend)
    if options.limit is not None:
        log.info(
            "memory limit %s: %s for the process itself (measured with the %s backend loaded, with slack), "
            "%s for tensor data",
            human_size(options.limit),
            human_size(baseline),
            backend,
            human_size(options.budget),
        )
    return options


def merge_one(
    config: str | Path | dict | MergeConfig,
    out_dir: str | Path,
    options: MergeOptions,
    before_commit: Callable[[Path], None] | None = None,
) -> Path:
    """Merge one config (a single stage) into ``out_dir``; see :func:`mergesmith.pipeline.api.merge`.
    ``before_commit`` is called with the finished temporary folder just before it is renamed to
    ``out_dir``, to add files that must only exist in a complete output (a stage's marker)."""
    start = time.perf_counter()
    text = config_text(config)
    cfg = load_config(config)
    shard_bytes = parse_size(options.out_shard_size)
    if shard_bytes <= 0:
        raise MergeError("--out-shard-size must be positive")
    run = exec_options_for(options)
    t0 = time.perf_counter()
    inputs = input_paths(config_refs(cfg))
    with OutputFolder(
        out_dir, options.overwrite, force=options.force, inputs=inputs, quiet=options.quiet
    ) as out:
        plan = build_plan(
            cfg,
            allow_crimes=options.allow_crimes,
            strict=options.strict,
            mergekit_compat=options.mergekit_compat,
            per_expert=options.per_expert,
        )
        try:
            for warning in plan.warnings:
                log.warning("%s", warning)
            log.info(
                "plan: %d tensors (%s) from %d models in %.2f s",
                len(plan.tensors),
                human_size(plan.total_bytes),
                len(plan.models),
                time.perf_counter() - t0,
            )
            ternary = _ternary_output(plan) if options.out_format == "bitnet" else None
            chosen, why = choose_backend(
                plan, run.backend, run.device, transformed_output=ternary is not None
            )
            backend = make_backend(chosen, plan, run.device)  # imports torch for the torch backend
            run = settle(plan, run, chosen)
            log_choices(plan, run, chosen, why)
            specs = (
                ternary.specs()
                if ternary
                else [TensorSpec(t.name, t.out_code, t.shape) for t in plan.tensors]
            )
            with ShardedWriter(out.path, specs, shard_bytes) as writer:
                t0 = time.perf_counter()
                _run(plan, writer, run, backend, options.quiet, ternary.hook(writer) if ternary else None)
                writer.finish()
                log.info("merge: tensors read, merged and written in %.2f s", time.perf_counter() - t0)
            t0 = time.perf_counter()
            _write_metadata(
                plan, out.path, text, options.copy_tokenizer, options.write_model_card, out.dest.name
            )
            if before_commit is not None:
                before_commit(out.path)
            final = out.commit(plan.models.values())
            log.info(
                "finish: config, tokenizer and card written, output renamed in %.2f s",
                time.perf_counter() - t0,
            )
        finally:
            plan.close()
    if not options.quiet:
        secs = time.perf_counter() - start
        size = human_size(plan.total_bytes)
        print(
            f"mergesmith: wrote {len(plan.tensors)} tensors ({size}) to {final} in {secs:.1f} s",
            file=sys.stderr,
        )
    return final


def log_choices(plan: MergePlan, options: ExecOptions, backend: str, why: str | None) -> None:
    """INFO lines (-v): the backend and why, the memory budget and the workers."""
    if backend == "native":
        reason = "--backend native" if options.backend == "native" else "every tensor has a native kernel"
    else:
        reason = why or "--backend torch"
    log.info("backend: %s (%s)", backend, reason)
    log.info(
        "memory: %s of tensor data in flight, %d worker(s); estimated peak %s",
        human_size(options.budget),
        options.workers,
        human_size(estimate_peak(plan, options, backend)),
    )


def _ternary_output(plan: MergePlan) -> TernaryOutput:
    """``--out-format bitnet``: the ternary output (specs and executor hook); the plan's output config
    gets its ``quantization_config``."""
    from mergesmith.pipeline.ternary_output import TernaryOutput

    ternary = TernaryOutput(plan)
    plan.out_config = ternary.config
    return ternary


def _run(
    plan: MergePlan,
    writer: ShardedWriter,
    options: ExecOptions,
    backend: Backend,
    quiet: bool,
    hook: OutputHook | None = None,
) -> None:
    bar = byte_progress(plan.total_bytes, f"merging ({plan.method.name})", quiet)
    done = [0]

    def progress(t) -> None:
        done[0] += 1
        bar.set_postfix_str(f"{done[0]}/{len(plan.tensors)} tensors", refresh=False)
        bar.update(t.nbytes)

    try:
        Executor(plan, writer, options, hook, backend).run(progress)
    finally:
        bar.close()


def _write_metadata(
    plan: MergePlan, folder: Path, text: str, copy_tokenizer: bool, card: bool, name: str
) -> None:
    write_json(folder / "config.json", plan.out_config)
    config_model = plan.models[plan.config_model]
    gen = config_model.optional_file("generation_config.json")  # checked to lie inside the model folder
    if gen is not None:
        copy_files([gen], folder)
        if plan.vocab is not None and plan.tokenizer_model != plan.config_model:
            gen_cfg = read_json_file(folder / "generation_config.json", "generation_config.json")
            rewrite_token_ids(gen_cfg, plan.vocab.vocabs[plan.config_model], plan.vocab.vocab)
            write_json(folder / "generation_config.json", gen_cfg)
    if copy_tokenizer:
        tok = plan.models[plan.tokenizer_model]
        if plan.vocab is not None and plan.vocab.union is not None:
            write_union_tokenizer(plan.vocab.union, tok, folder)
        else:
            copy_files(tok.tokenizer_files(), folder)
    if plan.config.chat_template:
        template = resolve_chat_template(plan.config.chat_template, list(plan.models.values()))
        if template:
            (folder / "chat_template.jinja").write_text(template)
            tok_cfg = folder / "tokenizer_config.json"
            if tok_cfg.is_file():
                data: dict[str, Any] = json.loads(tok_cfg.read_text())
                if data.pop("chat_template", None) is not None:
                    write_json(tok_cfg, data)
    if card:
        (folder / "README.md").write_text(model_card(plan, text, name))
        (folder / "mergesmith_config.yml").write_text(text if text.endswith("\n") else text + "\n")
