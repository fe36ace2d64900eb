"""Extract a LoRA adapter from a fine-tune: a truncated SVD of each weight's difference from its base.

For every selected 2-D weight, delta = W_model - W_base (float32) is split as ``B @ A`` with
``B = U_k sqrt(S_k)`` and ``A = sqrt(S_k) Vh_k``: the best rank-k approximation in Frobenius norm
(Eckart-Young), with the singular values shared evenly so that neither factor is badly scaled for
half-precision storage. ``lora_alpha = r`` and modules whose rank is smaller than ``r`` (a matrix thinner
than the requested rank) get matching ``rank_pattern``/``alpha_pattern`` entries, so every scale is 1.

One weight is in memory at a time (two inputs, the difference and the SVD's factors), and the adapter is
written tensor by tensor into a pre-laid-out safetensors file, so a model of any size fits.

The relative reconstruction error ``||delta - B A||_F / ||delta||_F`` is measured with the factors as
saved (after rounding to the output dtype), and tensors that differ but cannot be in a LoRA (norms,
biases, weights left out by the selection) are listed, so nothing is lost silently.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from mergesmith.core import dtypes
from mergesmith.core.arch import is_embedding, layer_of
from mergesmith.core.devices import check_device
from mergesmith.core.dtypes import dtype_name, parse_code
from mergesmith.core.errors import MergeError
from mergesmith.core.lora.adapter import ADAPTER_CONFIG, ADAPTER_WEIGHTS, PEFT_PREFIX
from mergesmith.core.lora.modules import ModuleKind, module_kinds
from mergesmith.core.model import ModelSource
from mergesmith.core.sources import open_source
from mergesmith.core.write import OutputFolder, ShardedWriter, TensorSpec, input_paths, write_json

REPORT_NAME = "lora_report.json"
ONE_FILE = 1 << 62  # shard size that keeps the adapter in one file, as PEFT expects


@dataclass(frozen=True)
class Target:
    """One weight to decompose and how PEFT will apply it."""

    tensor: str
    module: str
    kind: ModuleKind
    shape: tuple[int, ...]  # the weight as stored
    rank: int

    @property
    def matrix_shape(self) -> tuple[int, int]:
        """Shape of the matrix that is factored as B @ A: (out, in) for Linear, transposed otherwise."""
        rows, cols = self.shape
        return (rows, cols) if self.kind == "linear" else (cols, rows)

    def keys(self) -> tuple[str, str]:
        prefix = PEFT_PREFIX + self.module
        if self.kind == "embedding":
            return prefix + ".lora_embedding_A", prefix + ".lora_embedding_B"
        return prefix + ".lora_A.weight", prefix + ".lora_B.weight"


@dataclass(frozen=True)
class ModuleReport:
    module: str
    tensor: str
    kind: str
    shape: list[int]
    rank: int
    relative_error: float
    delta_norm: float


def extract_lora(
    base: str,
    model: str,
    out_dir: str | Path,
    *,
    rank: int,
    include_embeddings: bool = False,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    save_norms: bool = False,
    dtype: str | None = None,
    device: str = "cpu",
    overwrite: bool = False,
    force: bool = False,
    quiet: bool = False,
) -> list[ModuleReport]:
    """Write a PEFT LoRA adapter approximating ``model - base`` at rank ``rank`` to ``out_dir``.

    With ``save_norms``, modules outside the LoRA whose parameters are all vectors (norms) and differ are
    saved whole, as PEFT ``modules_to_save``. Returns one report per factored module;
    ``out_dir/lora_report.json`` holds the same and the tensors that differ but are not in the adapter.
    Nothing is written unless the whole extraction succeeds.
    """
    if rank < 1:
        raise MergeError(f"--rank must be at least 1, got {rank}")
    keep, drop = _compile(include, "--include"), _compile(exclude, "--exclude")
    dev = torch.device(check_device(device))
    if _same_model(base, model):
        raise MergeError(f"--model {model} is --base {base}: nothing differs, so there is no LoRA to extract")
    inputs = input_paths([base, model])
    with OutputFolder(out_dir, overwrite, force=force, inputs=inputs, quiet=quiet) as out:
        src_base = open_source(base)
        try:
            src_model = open_source(model)
        except BaseException:
            src_base.close()
            raise
        try:
            targets = select_targets(src_base, src_model, rank, include_embeddings, keep, drop)
            targets, unchanged = split_unchanged(src_base, src_model, targets)
            if not targets:
                raise MergeError(nothing_differs(src_base, src_model))
            out_code = parse_code(dtype, "--dtype") if dtype else _common_code(src_model, targets)
            saved = changed_norms(src_base, src_model, targets) if save_norms else {}
            reports = _write_adapter(src_base, src_model, targets, saved, out.path, out_code, dev, quiet)
            write_json(out.path / ADAPTER_CONFIG, adapter_config(base, src_model, targets, sorted(saved)))
            in_adapter = {t.tensor for t in targets} | {n for names in saved.values() for n in names}
            skipped = not_captured(src_base, src_model, in_adapter)
            report = _report(base, model, rank, out_code, reports, sorted(saved), skipped, unchanged)
            write_json(out.path / REPORT_NAME, report)
            out.commit([src_base, src_model])
        finally:
            src_base.close()
            src_model.close()
    if unchanged and not quiet:
        print(
            f"mergesmith: {len(unchanged)} selected module(s) are identical in both models and are not in "
            f"the adapter nor in the mean error (e.g. {unchanged[0]}); see {REPORT_NAME}",
            file=sys.stderr,
        )
    if skipped and not quiet:
        print(f"mergesmith: {summarise_skipped(skipped)}; see {REPORT_NAME}", file=sys.stderr)
    return reports


def _same_model(base: str, model: str) -> bool:
    """The same reference, or two spellings of one local folder."""
    if base == model:
        return True
    b, m = Path(base), Path(model)
    return b.is_dir() and m.is_dir() and b.resolve() == m.resolve()


def split_unchanged(
    base: ModelSource, model: ModelSource, targets: Sequence[Target]
) -> tuple[list[Target], list[str]]:
    """(targets whose weight differs from the base, modules of those that are identical). An identical
    weight would be a zero LoRA: it adds nothing to the adapter, and its error of 0 would flatter the mean.
    One weight pair is in memory at a time."""
    changed, same = [], []
    for t in targets:
        if torch.equal(model.read(t.tensor), base.read(t.tensor)):
            same.append(t.module)
        else:
            changed.append(t)
    return changed, same


def nothing_differs(base: ModelSource, model: ModelSource) -> str:
    """The one-line error when no selected weight differs: whether anything else does, and what."""
    others = not_captured(base, model, set())
    if not others:
        return (
            f"model {model.ref!r} is identical to base {base.ref!r} (no tensor differs); there is no LoRA "
            "to extract: check --model"
        )
    return (
        f"no selected weight of model {model.ref!r} differs from base {base.ref!r}, so the adapter would be "
        f"empty; {summarise_skipped(others)}"
    )


def summarise_skipped(skipped: Sequence[dict[str, Any]]) -> str:
    """One line: how many differing tensors the adapter leaves out, by reason, with an example of each."""
    groups: dict[str, list[str]] = {}
    for s in skipped:
        groups.setdefault(s["why"], []).append(s["tensor"])
    parts = [f"{len(names)} {why} (e.g. {names[0]})" for why, names in groups.items()]
    return f"{len(skipped)} tensor(s) differ but are not in the adapter: " + "; ".join(parts)


def _compile(patterns: Sequence[str], flag: str) -> list[re.Pattern[str]]:
    out = []
    for p in patterns:
        try:
            out.append(re.compile(p))
        except re.error as exc:
            raise MergeError(f"{flag} {p!r} is not a valid regular expression ({exc})") from None
    return out


def _fallback_kind(name: str) -> ModuleKind:
    """Without transformers' view of the architecture: vocabulary tables are embeddings, the rest Linear."""
    if is_embedding(name) and not name.endswith("lm_head.weight"):
        return "embedding"
    return "linear"


def select_targets(
    base: ModelSource,
    model: ModelSource,
    rank: int,
    include_embeddings: bool,
    include: Sequence[re.Pattern[str]] = (),
    exclude: Sequence[re.Pattern[str]] = (),
) -> list[Target]:
    """The 2-D weights to decompose: those inside decoder layers (plus embeddings and lm_head if asked),
    narrowed by the include/exclude patterns (``re.search`` on the module name)."""
    kinds = module_kinds(model.config) or {}
    targets: list[Target] = []
    for name, info in model.tensors.items():
        if len(info.shape) != 2 or not name.endswith(".weight") or info.code not in dtypes.FLOAT_CODES:
            continue
        module = name[: -len(".weight")]
        kind = kinds.get(module) or _fallback_kind(name)
        in_layer = layer_of(name) is not None
        vocab_table = kind == "embedding" or name.endswith("lm_head.weight")
        if not (in_layer or (include_embeddings and vocab_table)):
            continue
        if in_layer and kind == "embedding" and not include_embeddings:
            continue
        if include and not any(p.search(module) for p in include):
            continue
        if any(p.search(module) for p in exclude):
            continue
        _check_pair(base, model, name)
        targets.append(Target(name, module, kind, info.shape, min(rank, *info.shape)))
    if not targets:
        raise MergeError(
            f"model {model.ref!r}: no weights to extract (2-D weights inside decoder layers"
            f"{', embeddings and lm_head' if include_embeddings else ''}, after --include/--exclude)"
        )
    return targets


def _check_pair(base: ModelSource, model: ModelSource, name: str) -> None:
    info = model.tensors[name]
    other = base.tensors.get(name)
    if other is None:
        raise MergeError(f"base model {base.ref!r} has no tensor {name!r} (the fine-tuned model has it)")
    if other.shape != info.shape:
        raise MergeError(
            f"tensor {name!r}: shapes differ (base {base.ref!r}: {list(other.shape)}, model {model.ref!r}: "
            f"{list(info.shape)}); a LoRA needs models of the same architecture and size"
        )
    if other.code not in dtypes.FLOAT_CODES:
        raise MergeError(f"base model {base.ref!r}: tensor {name!r} is not floating-point")


def _common_code(model: ModelSource, targets: Sequence[Target]) -> str:
    codes = {model.tensors[t.tensor].code for t in targets}
    return codes.pop() if len(codes) == 1 else "F32"


def factorise(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """B (m x k), A (k x n) with B @ A the best rank-k approximation of ``delta`` (m x n)."""
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    root = s[:rank].sqrt()
    return u[:, :rank] * root, root[:, None] * vh[:rank]


def changed_norms(base: ModelSource, model: ModelSource, targets: Sequence[Target]) -> dict[str, list[str]]:
    """Modules outside the LoRA whose parameters are all floating-point vectors (norms, LayerNorm biases)
    and differ between the models: module -> its tensors. A LoRA cannot hold them; PEFT's
    modules_to_save can, whole (they are small)."""
    factored = {t.module for t in targets}
    groups: dict[str, list[str]] = {}
    for name in model.tensors:
        groups.setdefault(name.rpartition(".")[0], []).append(name)
    out: dict[str, list[str]] = {}
    for module, names in groups.items():
        if not module or module in factored:
            continue
        infos = [model.tensors[n] for n in names]
        if any(len(i.shape) != 1 or i.code not in dtypes.FLOAT_CODES for i in infos):
            continue
        if any(n not in base.tensors or base.tensors[n].shape != model.tensors[n].shape for n in names):
            continue
        if any(not torch.equal(model.read(n), base.read(n)) for n in names):
            out[module] = names
    return out


def _write_adapter(
    base: ModelSource,
    model: ModelSource,
    targets: Sequence[Target],
    saved: dict[str, list[str]],
    folder: Path,
    code: str,
    device: torch.device,
    quiet: bool,
) -> list[ModuleReport]:
    specs = []
    for t in targets:
        rows, cols = t.matrix_shape
        key_a, key_b = t.keys()
        specs += [TensorSpec(key_a, code, (t.rank, cols)), TensorSpec(key_b, code, (rows, t.rank))]
    whole = [n for names in saved.values() for n in names]
    specs += [TensorSpec(PEFT_PREFIX + n, model.tensors[n].code, model.tensors[n].shape) for n in whole]
    writer = ShardedWriter(folder, specs, ONE_FILE)
    reports = []
    try:
        for t in tqdm(targets, desc="extracting LoRA", unit="module", disable=quiet, file=sys.stderr):
            reports.append(_extract_one(base, model, t, writer, dtypes.torch_dtype(code), device))
        for n in whole:
            writer.write(PEFT_PREFIX + n, model.read(n))
        writer.finish()
    finally:
        writer.close()
    (folder / writer.files[0]).rename(folder / ADAPTER_WEIGHTS)
    return reports


def _extract_one(
    base: ModelSource,
    model: ModelSource,
    t: Target,
    writer: ShardedWriter,
    dtype: torch.dtype,
    device: torch.device,
) -> ModuleReport:
    compute = torch.float64 if model.tensors[t.tensor].code == "F64" else torch.float32
    delta = model.read(t.tensor).to(device, compute)
    delta -= base.read(t.tensor).to(device, compute)
    if not bool(torch.isfinite(delta).all()):  # the SVD would fail with a LAPACK error or return NaN
        raise MergeError(
            f"tensor {t.tensor!r}: the models' difference holds NaN or Inf (a non-finite weight in "
            f"{model.ref!r} or {base.ref!r}); a LoRA cannot be extracted from it"
        )
    if t.kind != "linear":
        delta = delta.T
    b, a = factorise(delta, t.rank)
    a, b = a.to(dtype), b.to(dtype)
    norm = float(torch.linalg.matrix_norm(delta))
    residual = float(torch.linalg.matrix_norm(delta - b.to(compute) @ a.to(compute)))
    key_a, key_b = t.keys()
    writer.write(key_a, a.contiguous())
    writer.write(key_b, b.contiguous())
    return ModuleReport(
        module=t.module,
        tensor=t.tensor,
        kind=t.kind,
        shape=list(t.shape),
        rank=t.rank,
        relative_error=residual / norm if norm > 0 else 0.0,
        delta_norm=norm,
    )


def adapter_config(
    base_ref: str, model: ModelSource, targets: Sequence[Target], saved: Sequence[str] = ()
) -> dict[str, Any]:
    """PEFT's adapter_config.json: r is the largest module rank, alpha = r, thinner modules by pattern;
    whole modules by full name (PEFT matches modules_to_save by suffix)."""
    r = max(t.rank for t in targets)
    thinner = {t.module: t.rank for t in targets if t.rank != r}
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_ref,
        "r": r,
        "lora_alpha": r,
        "rank_pattern": thinner,
        "alpha_pattern": dict(thinner),
        "target_modules": target_modules(model, targets),
        "fan_in_fan_out": any(t.kind == "conv1d" for t in targets),
        "use_rslora": False,
        "use_dora": False,
        "bias": "none",
        "lora_dropout": 0.0,
        "modules_to_save": list(saved) or None,
        "init_lora_weights": True,
        "inference_mode": True,
    }


def target_modules(model: ModelSource, targets: Sequence[Target]) -> list[str]:
    """Short names (``q_proj``) when they select exactly the extracted modules, else full module names,
    so PEFT never wraps a module the adapter has no weights for."""
    chosen = {t.module for t in targets}
    suffixes = {m.rsplit(".", 1)[-1] for m in chosen}
    modules = {
        n[: -len(".weight")] for n, i in model.tensors.items() if n.endswith(".weight") and len(i.shape) == 2
    }
    if {m for m in modules if m.rsplit(".", 1)[-1] in suffixes} == chosen:
        return sorted(suffixes)
    return sorted(chosen)


def not_captured(base: ModelSource, model: ModelSource, in_adapter: set[str]) -> list[dict[str, Any]]:
    """Tensors outside the adapter that differ between the models, with their relative change
    (``||model - base|| / ||base||``; None where that is undefined) and why they are not in it."""
    factored = {n.rpartition(".")[0] for n in in_adapter if n.endswith(".weight")}
    out: list[dict[str, Any]] = []
    for name, info in model.tensors.items():
        if name in in_adapter:
            continue
        other = base.tensors.get(name)
        if other is None or other.shape != info.shape:
            out.append({"tensor": name, "relative_change": None, "why": "missing or reshaped in the base"})
            continue
        a, b = model.read(name), base.read(name)
        if torch.equal(a, b):
            continue
        if info.code not in dtypes.FLOAT_CODES:
            out.append({"tensor": name, "relative_change": None, "why": "not floating-point"})
            continue
        a64, b64 = a.double(), b.double()
        ref = float(b64.norm())
        change = float((a64 - b64).norm()) / ref if ref > 0 else None
        why = _why(name, info.shape, name.rpartition(".")[0] in factored)
        out.append({"tensor": name, "relative_change": change, "why": why})
    return out


def _why(name: str, shape: tuple[int, ...], module_factored: bool) -> str:
    if module_factored:
        return "bias of a factored module (a LoRA cannot hold it)"
    if len(shape) != 2:
        return "not a matrix (norm or bias; see --save-norms)"
    if layer_of(name) is None:
        return "outside the decoder layers (see --include-embeddings)"
    if not name.endswith(".weight"):
        return "not a layer weight"
    return "left out by --include/--exclude"


def _report(
    base: str,
    model: str,
    rank: int,
    code: str,
    modules: list[ModuleReport],
    saved: list[str],
    skipped: list,
    unchanged: Sequence[str] = (),
) -> dict[str, Any]:
    errors = [m.relative_error for m in modules]
    worst = max(modules, key=lambda m: m.relative_error)
    return {
        "base_model": base,
        "model": model,
        "rank": rank,
        "dtype": dtype_name(code),
        "summary": {
            "modules": len(modules),
            "mean_relative_error": sum(errors) / len(errors),
            "max_relative_error": worst.relative_error,
            "worst_module": worst.module,
            "unchanged_modules": len(unchanged),
        },
        "modules": [asdict(m) for m in modules],
        "unchanged": list(unchanged),
        "saved_whole": saved,
        "not_captured": skipped,
    }


def format_table(reports: Sequence[ModuleReport]) -> str:
    """The per-module table ``mergesmith extract-lora`` prints."""
    width = max(len("module"), *(len(r.module) for r in reports))
    lines = [f"{'module':<{width}}  {'shape':>11}  {'rank':>4}  {'rel. error':>10}"]
    for r in reports:
        shape = "x".join(str(d) for d in r.shape)
        lines.append(f"{r.module:<{width}}  {shape:>11}  {r.rank:>4}  {r.relative_error:>10.4f}")
    errors = [r.relative_error for r in reports]
    worst = max(reports, key=lambda r: r.relative_error)
    lines.append(
        f"# {len(reports)} modules: mean relative error {sum(errors) / len(errors):.4f}, "
        f"max {worst.relative_error:.4f} ({worst.module})"
    )
    return "\n".join(lines)
