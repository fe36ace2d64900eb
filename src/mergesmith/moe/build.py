"""``build_moe(config, out_dir)``: dense models -> a sparse mixture-of-experts model folder.

    config ──► open models (headers) ──► check layouts ──► output family, config, tensor plan
           ──► routers (one base-model pass) ──► stream tensors into pre-laid-out shards ──► metadata

Tensors are streamed one at a time with :class:`ModelSource` reads and :class:`ShardedWriter` writes, so
peak memory is a few tensors (plus the base model during the prompt pass of the prompt-based modes).
Nothing is written to ``out_dir`` unless the whole build succeeds.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mergesmith.core import dtypes
from mergesmith.core.cliargs import check_workers
from mergesmith.core.defaults import DEFAULT_SHARD_SIZE
from mergesmith.core.devices import check_device, default_workers
from mergesmith.core.dtypes import dtype_name, parse_code
from mergesmith.core.errors import MergeError
from mergesmith.core.hf_load import drop_remote_code
from mergesmith.core.lora.source import split_lora_ref
from mergesmith.core.model import ModelSource
from mergesmith.core.rng import derive_seed
from mergesmith.core.sizes import human_size, parse_size
from mergesmith.core.sources import open_source
from mergesmith.core.write import (
    OutputFolder,
    ShardedWriter,
    TensorSpec,
    byte_progress,
    copy_files,
    input_paths,
)
from mergesmith.moe.activations import BaseRunner
from mergesmith.moe.card import moe_card
from mergesmith.moe.config import MoEConfig, load_moe_config
from mergesmith.moe.dense import DenseLayout
from mergesmith.moe.families import Family, choose_family, expected_tensors, transformers_config
from mergesmith.moe.gates import LayerReport, Routers, build_routers, shift_for_sigmoid
from mergesmith.pipeline.config import config_text  # one definition for merge and MoE builds

log = logging.getLogger("mergesmith.moe")
CONFIG_FILE = "mergesmith_moe_config.yml"


#: The dense layouts of the base, of each expert and of the shared expert (if any).
Layouts = tuple[DenseLayout, list[DenseLayout], DenseLayout | None]


@dataclass(frozen=True)
class Piece:
    """One input tensor (or computed router) written at ``byte_offset`` inside an output tensor."""

    source: str  # "base", "expert", "shared", "router", "shared_gate", "zeros"
    index: int  # expert index, or layer for routers
    tensor: str  # input tensor name ("" for computed pieces)
    byte_offset: int = 0
    noise_scale: float = 0.0
    scale: float = 1.0  # residual_scale, for down projections


@dataclass(frozen=True)
class OutTensor:
    name: str
    shape: tuple[int, ...]
    code: str  # safetensors dtype code
    pieces: tuple[Piece, ...]

    @property
    def dtype(self) -> torch.dtype:
        return dtypes.torch_dtype(self.code)

    @property
    def nbytes(self) -> int:
        return TensorSpec(self.name, self.code, self.shape).nbytes


@dataclass
class MoEPlan:
    """Everything decided before any tensor is read."""

    config: MoEConfig
    family: Family
    hf_config: Any
    base: ModelSource
    experts: list[ModelSource]
    shared: ModelSource | None
    base_layout: DenseLayout
    expert_layouts: list[DenseLayout]
    shared_layout: DenseLayout | None
    tensors: list[OutTensor]
    code: str  # the output's float dtype (safetensors code)
    fused: bool

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    def sources(self) -> list[ModelSource]:
        return list({id(s): s for s in [self.base, *self.experts, self.shared] if s is not None}.values())

    def close(self) -> None:
        for src in self.sources():
            src.close()


@dataclass
class MoEResult:
    path: Path
    family: str
    num_experts: int
    gate_mode: str
    reports: list[LayerReport] = field(default_factory=list)


def _open_all(cfg: MoEConfig) -> tuple[ModelSource, list[ModelSource], ModelSource | None]:
    """Open every model once (headers only). Experts may be ``model+adapter`` LoRA references; the base
    may not, since the prompt pass runs it with transformers from its folder."""
    if split_lora_ref(cfg.base_model)[1] is not None:
        raise MergeError(
            f"base_model {cfg.base_model!r} is a MODEL+ADAPTER reference; the MoE's base must be a model "
            "folder: apply the adapter first (mergesmith merge with merge_method: passthrough)"
        )
    cache: dict[str, ModelSource] = {}

    def get(ref: str) -> ModelSource:
        if ref not in cache:
            cache[ref] = open_source(ref)
        return cache[ref]

    shared = cfg.shared_expert
    base = get(cfg.base_model)
    experts = [get(e.source_model) for e in cfg.experts]
    return base, experts, get(shared.source_model) if shared else None


def _identity(src: ModelSource) -> str:
    """What makes two sources the same weights: the folder, plus the adapter for a LoRA reference."""
    adapter = split_lora_ref(src.ref)[1]
    return str(src.path.resolve()) + (f"+{adapter}" if adapter else "")


def _out_code(cfg: MoEConfig, base: ModelSource) -> str:
    """config ``dtype``; else the base config's (``dtype``/``torch_dtype``); else its embedding's."""
    chosen = parse_code(cfg.dtype, "dtype")
    if chosen is not None:
        return chosen
    for key in ("dtype", "torch_dtype"):
        value = base.config.get(key)
        if isinstance(value, str):
            try:
                return parse_code(value, f"base model config.json {key}")  # type: ignore[return-value]
            except MergeError:
                pass
    floats = [i.code for i in base.tensors.values() if i.code in dtypes.FLOAT_CODES]
    return floats[0] if floats else "F32"


def moe_refs(cfg: MoEConfig) -> list[str]:
    """Every model reference an MoE config reads: the base, the experts and the shared expert."""
    return [cfg.base_model, *(e.source_model for e in [*cfg.experts, *(cfg.shared_experts or [])])]


def make_moe_plan(config: str | Path | dict | MoEConfig, fused: bool = False) -> MoEPlan:
    """Parse the config, open the models (headers only), check them and plan every output tensor."""
    cfg = load_moe_config(config)
    base, experts, shared = _open_all(cfg)
    try:
        return _plan(cfg, base, experts, shared, fused)
    except BaseException:
        for s in {id(s): s for s in [base, *experts, shared] if s is not None}.values():
            s.close()
        raise


def _plan(
    cfg: MoEConfig, base: ModelSource, experts: list[ModelSource], shared: ModelSource | None, fused: bool
) -> MoEPlan:
    base_layout = DenseLayout.of(base)
    expert_layouts = [DenseLayout.of(s) for s in experts]
    for i, (layout, src) in enumerate(zip(expert_layouts, experts)):
        base_layout.check_expert(layout, src, base, f"expert {i}")
    shared_layout = DenseLayout.of(shared) if shared is not None else None
    if shared_layout is not None and shared is not None:
        base_layout.check_expert(shared_layout, shared, base, "shared expert")
    if len({_identity(s) for s in experts}) == 1 and len(experts) > 1:
        log.warning(
            "all %d experts are the same model %s: without training, the MoE computes what that dense "
            "model's feed-forward blocks compute",
            len(experts),
            experts[0].ref,
        )
    family = choose_family(base_layout.model_type, cfg.architecture, shared is not None)
    remote = drop_remote_code(dict(base.config), base.ref)  # families drop auto_map: say so
    if remote:
        log.warning("%s", remote)
    if len(experts) & (len(experts) - 1) and family.model_type == "mixtral":
        log.info(
            "%d experts is not a power of two; some runtimes (llama.cpp) prefer powers of two", len(experts)
        )
    code = _out_code(cfg, base)
    tied = "lm_head.weight" not in base.tensors
    attention_bias = any(n.endswith(("q_proj.bias", "k_proj.bias", "v_proj.bias")) for n in base.tensors)
    shared_size = (
        shared_layout.intermediate_size if shared_layout else (1 if family.shared_style == "qwen" else 0)
    )
    if family.shared_style == "deepseek" and shared_size % base_layout.intermediate_size:
        raise MergeError(
            f"{family.name}'s shared expert must be a whole number of routed experts wide "
            f"({base_layout.intermediate_size}), but shared expert {cfg.shared_expert.source_model!r} is "  # type: ignore[union-attr]
            f"{shared_size} wide; use a shared expert of that width, or architecture: qwen"
        )
    kwargs = family.config(
        base.config,
        num_experts=len(experts),
        experts_per_token=cfg.experts_per_token,
        expert_intermediate=base_layout.intermediate_size,
        shared_intermediate=shared_size,
        attention_bias=attention_bias,
        tied=tied,
        dtype=dtype_name(code),
    )
    hf_config = transformers_config(family, kwargs)
    expected = expected_tensors(hf_config)
    tensors = _tensor_plan(
        cfg, family, base, (base_layout, expert_layouts, shared_layout), code, fused, expected, tied
    )
    return MoEPlan(
        cfg,
        family,
        hf_config,
        base,
        experts,
        shared,
        base_layout,
        expert_layouts,
        shared_layout,
        tensors,
        code,
        fused,
    )


def _tensor_plan(
    cfg: MoEConfig,
    family: Family,
    base: ModelSource,
    layouts: Layouts,
    code: str,
    fused: bool,
    expected: dict[str, tuple[int, ...]],
    tied: bool,
) -> list[OutTensor]:
    """Output tensors in checkpoint order: base tensors as they come, each layer's MoE block after it."""
    layout = layouts[0]
    out: list[OutTensor] = []
    provided: set[str] = set()
    layer_of_prefix = {p: i for i, p in enumerate(layout.layer_prefixes)}
    pending = dict(layer_of_prefix)
    for name in layout.others:
        info = base.tensors[name]
        if name not in expected:
            raise MergeError(
                f"base model {base.ref!r}: tensor {name!r} has no place in a {family.name} model "
                f"(transformers' {family.architecture} has no such parameter)"
            )
        if expected[name] != info.shape:
            raise MergeError(
                f"base model {base.ref!r}: tensor {name!r} has shape {list(info.shape)} but {family.name} "
                f"expects {list(expected[name])}"
            )
        keep = info.code if info.code not in dtypes.FLOAT_CODES else code
        out.append(OutTensor(name, info.shape, keep, (Piece("base", 0, name),)))
        provided.add(name)
        for prefix in [p for p in pending if name.startswith(p + ".")]:
            out.extend(_moe_block(cfg, family, layouts, pending.pop(prefix), code, fused, expected))
    for layer in pending.values():
        out.extend(_moe_block(cfg, family, layouts, layer, code, fused, expected))
    provided.update(t.name for t in out)
    missing = [
        n
        for n in expected
        if n not in provided
        and not (tied and n == "lm_head.weight")
        and not _is_expert_param(family, n, fused)
    ]
    if missing:
        raise MergeError(
            f"base model {base.ref!r} has no tensor for {family.name}'s {missing[0]!r}; it cannot be this family's base"
        )
    return out


def _is_expert_param(family: Family, name: str, fused: bool) -> bool:
    """transformers' in-memory expert and router names, which the checkpoint layout names otherwise."""
    return not fused and (
        name.endswith(f".{family.memory_experts}.gate_up_proj")
        or name.endswith(f".{family.memory_experts}.down_proj")
        or name.endswith(f".{family.memory_router}")
    )


def _moe_block(
    cfg: MoEConfig,
    family: Family,
    layouts: Layouts,
    layer: int,
    code: str,
    fused: bool,
    expected: dict[str, tuple[int, ...]],
) -> list[OutTensor]:
    """One layer's router, experts and (Qwen MoE) shared expert and its gate."""
    layout, expert_layouts, shared_layout = layouts
    prefix = layout.layer_prefixes[layer]
    n, hidden, inter = len(cfg.experts), layout.hidden_size, layout.intermediate_size
    router = family.router_tensor(prefix, fused)
    out = [OutTensor(router, (n, hidden), code, (Piece("router", layer, ""),))]
    if f"{prefix}.{family.memory_router}" not in expected:
        raise MergeError(f"internal error: {family.name} has no router parameter {router!r}")
    if family.score_bias:  # selection-only bias, kept at zero so that the top-k is the logits' top-k
        out.append(OutTensor(f"{prefix}.{family.score_bias}", (n,), "F32", (Piece("zeros", 0, ""),)))

    def piece(e: int, proj: str, offset: int = 0) -> Piece:
        expert = cfg.experts[e]
        return Piece(
            "expert",
            e,
            expert_layouts[e].mlp[layer][proj],
            offset,
            noise_scale=expert.noise_scale or 0.0,
            scale=expert.residual_scale if proj == "down" and expert.residual_scale is not None else 1.0,
        )

    if fused or family.stacked:
        # [E, 2I, d] with each expert's gate rows before its up rows, and [E, d, I]: transformers 5's
        # in-memory layout, and the checkpoint layout of families that store experts stacked
        if fused:
            names = (
                f"{prefix}.{family.memory_experts}.gate_up_proj",
                f"{prefix}.{family.memory_experts}.down_proj",
            )
        else:
            names = (f"{prefix}.{family.stacked[0]}", f"{prefix}.{family.stacked[1]}")  # type: ignore[index]
        matrix = inter * hidden * dtypes.itemsize(code)
        gate_up = tuple(
            p
            for e in range(n)
            for p in (piece(e, "gate", 2 * e * matrix), piece(e, "up", (2 * e + 1) * matrix))
        )
        out.append(OutTensor(names[0], (n, 2 * inter, hidden), code, gate_up))
        out.append(
            OutTensor(
                names[1], (n, hidden, inter), code, tuple(piece(e, "down", e * matrix) for e in range(n))
            )
        )
        memory = (
            f"{prefix}.{family.memory_experts}.gate_up_proj",
            f"{prefix}.{family.memory_experts}.down_proj",
        )
        for t, name in zip(out[-2:], memory):
            if expected.get(name) != t.shape:
                raise MergeError(
                    f"internal error: {t.name} {t.shape} does not match transformers' {expected.get(name)}"
                )
    else:
        for e in range(n):
            for proj in ("gate", "up", "down"):
                shape = (inter, hidden) if proj != "down" else (hidden, inter)
                out.append(OutTensor(family.expert_tensor(prefix, e, proj), shape, code, (piece(e, proj),)))
    if family.shared_style == "qwen":
        out.extend(_shared_block(cfg, prefix, layout, shared_layout, layer, code))
    elif family.shared_style is not None and (family.shared_style == "deepseek" or shared_layout):
        out.extend(_ungated_shared_block(cfg, family, prefix, layout, shared_layout, layer, code))
    return out


def _shared_block(
    cfg: MoEConfig,
    prefix: str,
    layout: DenseLayout,
    shared_layout: DenseLayout | None,
    layer: int,
    code: str,
) -> list[OutTensor]:
    """The shared expert copied from its model (down_proj times residual_scale), or a zero expert of
    width 1 when none is configured: it adds exactly 0, so the MoE is just its routed experts."""
    hidden = layout.hidden_size
    out = []
    shared = cfg.shared_expert
    for proj in ("gate", "up", "down"):
        name = f"{prefix}.mlp.shared_expert.{proj}_proj.weight"
        if shared is None or shared_layout is None:
            shape = (1, hidden) if proj != "down" else (hidden, 1)
            out.append(OutTensor(name, shape, code, (Piece("zeros", 0, ""),)))
            continue
        inter = shared_layout.intermediate_size
        shape = (inter, hidden) if proj != "down" else (hidden, inter)
        scale = shared.residual_scale if proj == "down" and shared.residual_scale is not None else 1.0
        piece = Piece("shared", 0, shared_layout.mlp[layer][proj], 0, shared.noise_scale or 0.0, scale)
        out.append(OutTensor(name, shape, code, (piece,)))
    gate = Piece("zeros" if shared is None else "shared_gate", layer, "")
    out.append(OutTensor(f"{prefix}.mlp.shared_expert_gate.weight", (1, hidden), code, (gate,)))
    return out


def _ungated_shared_block(
    cfg: MoEConfig,
    family: Family,
    prefix: str,
    layout: DenseLayout,
    shared_layout: DenseLayout | None,
    layer: int,
    code: str,
) -> list[OutTensor]:
    """An always-active shared expert (no gate): DeepSeek-V3 / GLM4-MoE ``mlp.shared_experts.*`` (none
    given: zero-width tensors, n_shared_experts 0), GraniteMoeShared ``shared_mlp`` (gate and up rows
    stacked in ``input_linear``, down in ``output_linear``)."""
    hidden = layout.hidden_size
    shared = cfg.shared_expert
    inter = shared_layout.intermediate_size if shared_layout is not None else 0

    def piece(proj: str, offset: int = 0) -> Piece:
        assert shared is not None and shared_layout is not None
        scale = shared.residual_scale if proj == "down" and shared.residual_scale is not None else 1.0
        return Piece("shared", 0, shared_layout.mlp[layer][proj], offset, shared.noise_scale or 0.0, scale)

    if family.shared_style == "granite":
        half = inter * hidden * dtypes.itemsize(code)
        return [
            OutTensor(
                f"{prefix}.shared_mlp.input_linear.weight",
                (2 * inter, hidden),
                code,
                (piece("gate"), piece("up", half)),
            ),
            OutTensor(f"{prefix}.shared_mlp.output_linear.weight", (hidden, inter), code, (piece("down"),)),
        ]
    out = []
    for proj in ("gate", "up", "down"):
        shape = (inter, hidden) if proj != "down" else (hidden, inter)
        pieces = (piece(proj),) if inter else ()
        out.append(OutTensor(f"{prefix}.mlp.shared_experts.{proj}_proj.weight", shape, code, pieces))
    return out


# --- execution ----------------------------------------------------------------------------------------


def _runner(plan: MoEPlan, batch_size: int, device: str) -> Callable[[], BaseRunner]:
    def load() -> BaseRunner:
        if plan.config.mode == "cheap_embed":
            return BaseRunner.tokenizer_only(plan.base.path, plan.base.ref)
        return BaseRunner.load(
            plan.base.path, plan.base.ref, batch_size=batch_size, device=device, source=plan.base
        )

    return load


def _expert_mlps(plan: MoEPlan, e: int) -> dict[str, torch.Tensor]:
    """Expert e's feed-forward tensors, named as the base model's (what the MoE's expert e computes)."""
    out = {}
    for base_mlp, expert_mlp in zip(plan.base_layout.mlp, plan.expert_layouts[e].mlp, strict=True):
        for proj, name in base_mlp.items():
            out[name] = plan.experts[e].read(expert_mlp[proj])
    return out


def _piece_tensor(plan: MoEPlan, t: OutTensor, p: Piece, routers: Routers, seed: int) -> torch.Tensor:
    """The values of one piece, in the output dtype."""
    if p.source == "router":
        return routers.weights[p.index].to(t.dtype)
    if p.source == "shared_gate":
        assert routers.shared_gate is not None
        return routers.shared_gate[p.index].to(t.dtype)
    if p.source == "zeros":
        return torch.zeros(t.shape, dtype=t.dtype)
    src = plan.base if p.source == "base" else plan.experts[p.index] if p.source == "expert" else plan.shared
    assert src is not None
    x = src.read(p.tensor)
    if p.noise_scale == 0.0 and p.scale == 1.0:
        return x if x.dtype == t.dtype or not x.is_floating_point() else x.to(t.dtype)
    x = x.float()
    if p.noise_scale:
        # seeded by what the noise is added to, so both expert layouts get the same noise
        g = torch.Generator().manual_seed(derive_seed(seed, "noise", p.source, p.index, p.tensor))
        x = x + torch.randn(x.shape, generator=g) * p.noise_scale
    if p.scale != 1.0:
        x = x * p.scale
    out = x.to(t.dtype)
    if not bool(torch.isfinite(out).all()):  # a residual_scale or noise_scale too large for the dtype
        raise MergeError(
            f"{p.tensor} of {p.source} {p.index} is not finite in {t.dtype} after noise_scale "
            f"{p.noise_scale} and residual_scale {p.scale}; use smaller values"
        )
    return out


def _stream(
    plan: MoEPlan, writer: ShardedWriter, routers: Routers, seed: int, workers: int, quiet: bool
) -> None:
    """Write every output tensor; up to ``workers`` tensors are read, transformed and written at once."""
    bar = byte_progress(plan.total_bytes, "building MoE", quiet)

    def one(t: OutTensor) -> int:
        for p in t.pieces:
            writer.write(t.name, _piece_tensor(plan, t, p, routers, seed), p.byte_offset)
        return t.nbytes

    try:
        for nbytes in _bounded_map(one, plan.tensors, workers):
            bar.update(nbytes)
    finally:
        bar.close()


def _bounded_map(fn: Callable[[OutTensor], int], items: list[OutTensor], workers: int) -> Iterator[int]:
    """``map`` with at most ``workers`` items in flight (memory is bounded by tensors, not models)."""
    if workers <= 1:
        yield from map(fn, items)
        return
    with ThreadPoolExecutor(workers) as pool:
        inflight: list[Future[int]] = []
        for item in items:
            if len(inflight) >= workers:
                yield inflight.pop(0).result()
            inflight.append(pool.submit(fn, item))
        for f in inflight:
            yield f.result()


def build_moe(
    config: str | Path | dict | MoEConfig,
    out_dir: str | Path,
    *,
    overwrite: bool = False,
    force: bool = False,
    random_seed: int = 0,
    out_shard_size: str | int = DEFAULT_SHARD_SIZE,
    device: str = "cpu",
    batch_size: int = 16,
    fused_experts: bool = False,
    workers: int | None = None,
    quiet: bool = False,
    copy_tokenizer: bool = True,
    write_model_card: bool = True,
) -> MoEResult:
    """Build the MoE that ``config`` describes into a new model folder ``out_dir``; ``workers`` tensors
    are copied at once (default: as many as a merge uses)."""
    start = time.perf_counter()
    device = check_device(device)
    workers = check_workers(workers) or default_workers()
    text = config_text(config)
    shard_bytes = parse_size(out_shard_size)
    if shard_bytes <= 0:
        raise MergeError("--out-shard-size must be positive")
    if batch_size < 1:
        raise MergeError("--batch-size must be at least 1")
    cfg = load_moe_config(config)
    with OutputFolder(out_dir, overwrite, force=force, inputs=input_paths(moe_refs(cfg)), quiet=quiet) as out:
        plan = make_moe_plan(cfg, fused=fused_experts)
        try:
            routers = build_routers(
                plan.config,
                plan.base,
                plan.base_layout.num_layers,
                plan.base_layout.hidden_size,
                seed=random_seed,
                runner=_runner(plan, batch_size, device),
                router_name=lambda layer: plan.family.router_tensor(
                    plan.base_layout.layer_prefixes[layer], fused_experts
                ),
                expert_mlps=lambda e: _expert_mlps(plan, e),
            )
            if plan.family.sigmoid_gate:
                routers = shift_for_sigmoid(routers)
            specs = [TensorSpec(t.name, t.code, t.shape) for t in plan.tensors]
            with ShardedWriter(out.path, specs, shard_bytes) as writer:
                _stream(plan, writer, routers, random_seed, workers, quiet)
                writer.finish()
            _write_metadata(plan, out.path, text, copy_tokenizer, write_model_card, out.dest.name)
            final = out.commit(plan.sources())
        finally:
            plan.close()
    if not quiet:
        print(
            f"mergesmith: wrote a {plan.family.name} model with {len(plan.experts)} experts "
            f"({human_size(plan.total_bytes)}) to {final} in {time.perf_counter() - start:.1f} s",
            file=sys.stderr,
        )
    return MoEResult(final, plan.family.name, len(plan.experts), plan.config.mode, routers.reports)


def _write_metadata(
    plan: MoEPlan, folder: Path, text: str, copy_tokenizer: bool, card: bool, name: str
) -> None:
    plan.hf_config.to_json_file(folder / "config.json", use_diff=True)
    gen = plan.base.optional_file("generation_config.json")  # checked to lie inside the model folder
    if gen is not None:
        copy_files([gen], folder)
    if copy_tokenizer:
        copy_files(plan.base.tokenizer_files(), folder)
    if card:
        (folder / "README.md").write_text(moe_card(plan, text, name))
        (folder / CONFIG_FILE).write_text(text if text.endswith("\n") else text + "\n")
