"""``inspect``'s engine: open the models, check them from headers, then stream every tensor the base and
all models share (one tensor at a time, large ones in row chunks, as a merge reads them) and sum what
stats.py sums; the result is one JSON-ready dict (docs/inspect.md lists its keys).

Tensors are paired by name: the base's tensor ``n`` against each model's tensor ``n`` (and the merged
model's, with ``merged``). A config's method and its resolved parameters come from the merge's own plan
(pipeline/plan.py), so each tensor is inspected with the density, weights and t the merge would use.
"""

from __future__ import annotations

import math
import re
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mergesmith.core.arch import is_embedding, is_pre, layer_of
from mergesmith.core.dtypes import FLOAT_CODES
from mergesmith.core.errors import MergeError, one_line
from mergesmith.core.model import ModelSource, TensorInfo
from mergesmith.core.sources import open_source
from mergesmith.inspection import compat
from mergesmith.inspection.report import short
from mergesmith.inspection.stats import (
    Sums,
    election,
    figures,
    merged_sums,
    pair_sums,
    slerp_angle,
    trimmed_sums,
)

SCHEMA = 1  # bumped when a key of the JSON changes meaning or goes away
CHUNK_ELEMENTS = 1 << 22  # values per input per chunk: 16 MiB of float32 for each model read at once
ROWS_PER_TENSOR = 4  # rows of each matrix sampled for the PCA of rows
MODULES = ("embedding", "attention", "mlp", "norm", "other")
METHODS_SHOWN = ("ties", "dare_linear", "dare_ties", "slerp")


def module_of(name: str) -> str:
    """The module kind of a tensor, from its name: embedding (vocabulary-indexed: embeddings, lm_head),
    norm, attention, mlp (feed-forward and experts) or other."""
    low = name.lower()
    if is_embedding(name):
        return "embedding"
    if "norm" in low or re.search(r"(^|\.)ln(_\w+)?\.", low):  # GPT-2's ln_1, ln_f
        return "norm"
    if any(w in low for w in ("attn", "attention", "q_proj", "k_proj", "v_proj", "o_proj", "qkv")):
        return "attention"
    if any(
        w in low
        for w in (
            "mlp",
            "feed_forward",
            "ffn",
            "expert",
            "gate_proj",
            "up_proj",
            "down_proj",
            "fc1",
            "fc2",
            "c_fc",
        )
    ):
        return "mlp"
    return "other"


def layer_label(name: str) -> str:
    """``L<n>`` for a layer's tensor; ``pre`` (embeddings, towers) or ``post`` (final norm, lm_head) else."""
    n = layer_of(name)
    if n is not None:
        return f"L{n}"
    return "pre" if is_pre(name) else "post"


def _layer_order(label: str) -> tuple[int, int]:
    if label == "pre":
        return (0, 0)
    if label == "post":
        return (2, 0)
    return (1, int(label[1:]))


@dataclass
class Inputs:
    """What to inspect: the base, the models (their task vectors), the optional merged output, and the
    merge's plan (None for models given on the command line, or a config whose plan fails)."""

    base: str
    models: list[str]
    merged: str | None = None
    method: str | None = None
    config_text: str | None = None
    plan: Any = None
    problems: list[compat.Problem] = field(default_factory=list)


def config_refs(config: Any) -> list[str]:
    if config.models is not None:
        refs = [m.model for m in config.models]
    else:
        refs = [s.model for sl in config.slices or [] for s in sl.sources]
    return list(dict.fromkeys(refs))


def open_inputs(
    inputs: Sequence[str], base: str | None, merged: str | None
) -> tuple[Inputs, dict[str, ModelSource]]:
    """Read the config (one path that is a file) or take the models, open every model from its headers
    (an unreadable one is a MergeError: exit code 2), and plan the config's merge."""
    from mergesmith.pipeline.config import config_text, load_config

    is_config = len(inputs) == 1 and (Path(inputs[0]).is_file() or inputs[0].endswith((".yml", ".yaml")))
    if is_config:
        config = load_config(inputs[0])
        base_ref = base or config.base_model
        if base_ref is None:
            raise MergeError(
                f"{inputs[0]}: the config has no base_model, and task vectors need one; pass --base MODEL"
            )
        models = [r for r in config_refs(config) if r != base_ref]
        spec = Inputs(base_ref, models, merged, config.merge_method, config_text(inputs[0]))
    else:
        if base is None:
            raise MergeError("give the base model with --base MODEL (or a merge config instead of models)")
        models = [r for r in dict.fromkeys(inputs) if r != base]
        spec = Inputs(base, models, merged)
    if not spec.models:
        raise MergeError("nothing to inspect: give at least one model besides the base")
    sources = {ref: open_source(ref) for ref in dict.fromkeys([spec.base, *spec.models])}
    if merged is not None:
        sources[f"merged:{merged}"] = open_source(merged)
    spec.problems = compat.check_headers(sources[spec.base], [sources[r] for r in spec.models])
    if is_config:
        spec.plan = _plan(config, sources, spec)
    return spec, sources


def _plan(config: Any, sources: dict[str, ModelSource], spec: Inputs) -> Any:
    """The merge's plan (its parameters per tensor), or None with the reason the merge would stop."""
    from mergesmith.pipeline.plan import build_plan

    try:
        plan = build_plan(
            config, {r: s for r, s in sources.items() if not r.startswith("merged:")}, allow_crimes=True
        )
    except MergeError as exc:
        spec.problems.append(
            compat.Problem("error", "plan", None, f"the merge would stop: {one_line(str(exc))}")
        )
        return None
    for w in plan.warnings:
        spec.problems.append(compat.Problem("warning", "plan", None, f"the merge warns: {w}"))
    return plan


@dataclass
class Job:
    """One tensor to inspect: its name in every model, the method and the method's parameters for it
    (per-model ones in the order of ``Inputs.models``)."""

    name: str
    info: TensorInfo
    method: str | None
    params: dict[str, Any] | None
    merged: bool

    @property
    def rows(self) -> int:
        return self.info.shape[0] if len(self.info.shape) >= 2 else 1

    @property
    def row_len(self) -> int:
        return max(1, self.info.numel // max(1, self.rows))

    def chunks(self) -> list[tuple[int, int] | None]:
        if len(self.info.shape) < 2:
            return [None]
        step = max(1, CHUNK_ELEMENTS // self.row_len)
        return [(r, min(r + step, self.rows)) for r in range(0, self.rows, step)] or [None]


def plan_jobs(spec: Inputs, sources: dict[str, ModelSource]) -> tuple[list[Job], list[str]]:
    """The tensors every model shares with the base, with the same shape and a floating dtype, in the
    base's order; and the names left out (they are in the compatibility section)."""
    base = sources[spec.base]
    merged = sources.get(f"merged:{spec.merged}") if spec.merged else None
    by_name = _plan_params(spec)
    jobs, skipped = [], []
    for name, info in base.tensors.items():
        others = [sources[r].tensors.get(name) for r in spec.models]
        if info.code not in FLOAT_CODES:
            continue
        if any(o is None or o.shape != info.shape or o.code not in FLOAT_CODES for o in others):
            skipped.append(name)
            continue
        m_info = merged.tensors.get(name) if merged is not None else None
        has_merged = m_info is not None and m_info.shape == info.shape and m_info.code in FLOAT_CODES
        method, params = by_name.get(name, (None, None))
        jobs.append(Job(name, info, method, params, has_merged))
    if merged is not None and jobs and not any(j.merged for j in jobs):
        # another model's folder: every survival would be a silent '-'
        raise MergeError(
            f"--merged {spec.merged}: none of its tensors has a name and shape of the base's; pass the "
            "folder this merge wrote"
        )
    return jobs, skipped


def _plan_params(spec: Inputs) -> dict[str, tuple[str, dict[str, Any]]]:
    """Base tensor name -> (method, parameters with per-model tuples in spec.models order), from the plan."""
    plan = spec.plan
    if plan is None:
        return {}
    out = {}
    per_model = {p.name for p in plan.method.params if p.per_model}
    for t in plan.tensors:
        if t.base is None or t.base.model != spec.base or t.method != plan.method.name:
            continue
        refs = [s.model for s in t.inputs]
        if sorted(refs) != sorted(spec.models):
            continue
        params = {}
        for key, value in t.params:
            params[key] = tuple(value[refs.index(r)] for r in spec.models) if key in per_model else value
        out[t.base.tensor] = (t.method, params)
    return out


def _read(src: ModelSource, name: str, rows: tuple[int, int] | None) -> np.ndarray:
    """Tensor ``name`` (rows ``rows``) as flat float32, widened as the merge widens it."""
    from mergesmith.pipeline.backends.convert import to_float32

    if type(src).read is not ModelSource.read:  # MODEL+ADAPTER, packed BitNet: their reads transform
        return np.ascontiguousarray(src.read(name, rows).float().reshape(-1).numpy())
    info = src.tensors[name]
    raw = src.read_array(name, rows).reshape(-1)
    if info.code in ("F32", "BF16", "F16"):
        return np.ascontiguousarray(to_float32(raw, info.code))
    return raw.astype(np.float32)


@dataclass
class RowSample:
    tensor: str
    row: int
    layer: str
    module: str
    values: np.ndarray  # (models, row_len) float32 task-vector rows


class Streamer:
    """Reads and sums one tensor after another (``run``); ``progress`` is called with the bytes read."""

    def __init__(self, spec: Inputs, sources: dict[str, ModelSource], progress: Callable[[int], None]):
        self.spec = spec
        self.base = sources[spec.base]
        self.models = [sources[r] for r in spec.models]
        self.merged = sources.get(f"merged:{spec.merged}") if spec.merged else None
        self.progress = progress
        self.samples: list[RowSample] = []
        self.sample_len = _sample_len(self.base)

    def passes(self, job: Job) -> int:
        return 3 if self._ties(job) and len(job.chunks()) > 1 else 1

    def bytes_read(self, job: Job) -> int:
        """The bytes ``run`` reads for ``job``: base and models in every pass, the merged model in the
        first only."""
        return self._pass_bytes(job) * self.passes(job) + job.info.nbytes * int(job.merged)

    def _pass_bytes(self, job: Job) -> int:
        return job.info.nbytes * (1 + len(self.models))

    def _ties(self, job: Job) -> bool:
        return job.method == "ties" and job.params is not None

    def _taus(self, job: Job, rows: tuple[int, int] | None) -> tuple[np.ndarray, np.ndarray]:
        from mergesmith.core.loops import difference

        base = _read(self.base, job.name, rows)
        taus = np.empty((len(self.models), base.shape[0]), dtype=np.float32)
        for i, src in enumerate(self.models):
            if type(src).read is ModelSource.read and src.tensors[job.name].code in ("BF16", "F32"):
                # widened as read, in the same pass as the subtraction (the merge's own loop)
                difference(src.read_array(job.name, rows).reshape(-1), base, taus[i])
            else:
                np.subtract(_read(src, job.name, rows), base, out=taus[i])
        return base, taus

    def run(self, job: Job) -> Sums:
        s = Sums(len(self.models))
        selectors, keep = self._selectors(job) if self._ties(job) else (None, None)
        chunks = job.chunks()
        sample_rows = self._sample_rows(job)
        held: np.ndarray | None = None
        for rows in chunks:
            base, taus = self._taus(job, rows)
            pair_sums(s, base, taus)
            self._sample(job, rows, taus, sample_rows)
            if job.merged:
                assert self.merged is not None
                merged_sums(s, base, _read(self.merged, job.name, rows), taus)
            if selectors is not None:
                if len(chunks) == 1:
                    held = taus
                for i, sel in enumerate(selectors):
                    if sel is not None:
                        (sel.find_in if len(chunks) == 1 else sel.observe_hi)(taus[i])
            self.progress((self._pass_bytes(job) + job.info.nbytes * int(job.merged)) // len(chunks))
        if selectors is not None and len(chunks) > 1:
            for sel in selectors:
                if sel is not None:
                    sel.end_hi()
            for rows in chunks:
                _, taus = self._taus(job, rows)
                for i, sel in enumerate(selectors):
                    if sel is not None:
                        sel.observe_lo(taus[i])
                self.progress(self._pass_bytes(job) // len(chunks))
            for sel in selectors:
                if sel is not None:
                    sel.end_lo()
        if selectors is not None:
            assert keep is not None and job.params is not None
            weights = np.asarray(job.params["weight"], dtype=np.float64)
            if len(chunks) == 1:
                assert held is not None
                self._trim(s, held, selectors, keep, weights)
            else:
                for rows in chunks:
                    _, taus = self._taus(job, rows)
                    self._trim(s, taus, selectors, keep, weights)
                    self.progress(self._pass_bytes(job) // len(chunks))
            s.ties_numel = job.info.numel
        self._method_sums(s, job)
        return s

    def _selectors(self, job: Job) -> tuple[list[Any], list[int]]:
        """The TIES kernel's own top-k selectors for this tensor (methods/task_arithmetic.py): the merge
        trims with exactly these."""
        from mergesmith.methods.sparsify import keep_count
        from mergesmith.methods.task_arithmetic import TiesKernel

        assert job.params is not None
        kernel = TiesKernel(job.params, job.info.numel)
        keep = [keep_count(d, job.info.numel) for d in job.params["density"]]
        return kernel.selectors, keep

    @staticmethod
    def _trim(s: Sums, taus: np.ndarray, selectors: list[Any], keep: list[int], weights: np.ndarray) -> None:
        trimmed = np.empty_like(taus)
        for i, sel in enumerate(selectors):
            if keep[i] == 0:
                trimmed[i] = 0.0
            elif sel is None:
                trimmed[i] = taus[i]
            else:
                trimmed[i] = sel.trim(taus[i])
            trimmed_sums(s, i, taus[i], trimmed[i])
        election(s, trimmed, weights)

    def _method_sums(self, s: Sums, job: Job) -> None:
        if job.params is None:
            return
        if job.method in ("dare_linear", "dare_ties"):
            for i, d in enumerate(job.params["density"]):
                mass = float(s.gram[i, i])
                s.dare_kept_mass[i] += min(1.0, float(d)) * mass
                s.dare_mass[i] += mass
        elif job.method == "slerp":
            angle = slerp_angle(s)
            if angle is not None:
                s.slerp_angle_sum += angle * job.info.numel
                s.slerp_numel += job.info.numel

    def _sample_rows(self, job: Job) -> list[int]:
        if len(job.info.shape) != 2 or job.row_len != self.sample_len or job.rows < 1:
            return []
        rng = np.random.default_rng(zlib.crc32(job.name.encode()))
        n = min(ROWS_PER_TENSOR, job.rows)
        return sorted(int(r) for r in rng.choice(job.rows, size=n, replace=False))

    def _sample(self, job: Job, rows: tuple[int, int] | None, taus: np.ndarray, wanted: list[int]) -> None:
        r0, r1 = rows if rows is not None else (0, job.rows)
        for r in wanted:
            if r0 <= r < r1:
                j = (r - r0) * job.row_len
                self.samples.append(
                    RowSample(
                        job.name,
                        r,
                        layer_label(job.name),
                        module_of(job.name),
                        taus[:, j : j + job.row_len].copy(),
                    )
                )


def _sample_len(base: ModelSource) -> int:
    """The row length sampled for the PCA: the hidden size (rows of the projections that read the
    residual stream), else the most common row length of the matrices."""
    hidden = compat.text_value(base.config, "hidden_size") or compat.text_value(base.config, "n_embd")
    if isinstance(hidden, int) and hidden > 0:
        return hidden
    lengths = [i.shape[1] for i in base.tensors.values() if len(i.shape) == 2]
    return max(set(lengths), key=lengths.count) if lengths else 0


def inspect_models(
    inputs: Sequence[str],
    *,
    base: str | None = None,
    merged: str | None = None,
    quiet: bool = True,
    on_compat: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Inspect a merge config (one path) or models (with ``base``); see docs/inspect.md for the result.

    ``on_compat`` receives the compatibility section as soon as the headers are checked, before any
    tensor is read (the command prints it then)."""
    from mergesmith.core.write import byte_progress

    spec, sources = open_inputs(inputs, base, merged)
    try:
        jobs, skipped = plan_jobs(spec, sources)
        header = {
            "base": spec.base,
            "models": list(spec.models),
            "problems": [p.to_json() for p in spec.problems],
            "verdict": compat.verdict_of(spec.problems),
        }
        if on_compat is not None:
            on_compat(header)
        streamer = Streamer(spec, sources, lambda n: None)
        with byte_progress(sum(streamer.bytes_read(j) for j in jobs), "inspect", quiet) as bar:
            streamer.progress = bar.update
            per_tensor = [(job, streamer.run(job)) for job in jobs]
        return build_report(spec, per_tensor, skipped, streamer.samples)
    finally:
        for src in sources.values():
            src.close()


def build_report(
    spec: Inputs, per_tensor: list[tuple[Job, Sums]], skipped: list[str], samples: list[RowSample]
) -> dict[str, Any]:
    m = len(spec.models)
    total = Sums(m)
    groups: dict[tuple[str, str], Sums] = {}
    group_tensors: dict[tuple[str, str], int] = {}
    method = spec.method if spec.method in METHODS_SHOWN else None
    for job, s in per_tensor:
        total.add(s)
        key = (layer_label(job.name), module_of(job.name))
        groups.setdefault(key, Sums(m)).add(s)
        group_tensors[key] = group_tensors.get(key, 0) + 1
    totals = figures(total, method)
    problems = list(spec.problems) + non_finite_problems(spec, per_tensor)
    shared = []
    for i, ref in enumerate(spec.models):
        d = base_distance(per_tensor, i)
        verdict, problem = compat.shared_base_verdict(ref, math.nan if d is None else d)
        shared.append(
            {
                "model": ref,
                "relative_distance": d,
                "relative_norm": totals["relative_norm"][i],
                "verdict": verdict,
            }
        )
        if problem is not None:
            problems.append(problem)
    ordered = sorted(groups, key=lambda k: (_layer_order(k[0]), MODULES.index(k[1])))
    group_rows = [
        {"layer": k[0], "module": k[1], "tensors": group_tensors[k], **figures(groups[k], method)}
        for k in ordered
    ]
    report: dict[str, Any] = {
        "schema": SCHEMA,
        "base": spec.base,
        "models": list(spec.models),
        "merged": spec.merged,
        "method": spec.method,
        "config": spec.config_text,
        "compatibility": {
            "verdict": compat.verdict_of(problems),
            "problems": [p.to_json() for p in problems],
            "shared_base": shared,
            "thresholds": {"distant": compat.DISTANT, "not_a_finetune": compat.NOT_FINETUNE},
            "tensors_not_inspected": skipped,
        },
        "totals": totals,
        "groups": group_rows,
        "tensors": [
            {
                "name": job.name,
                "layer": layer_label(job.name),
                "module": module_of(job.name),
                **figures(s, method),
            }
            for job, s in per_tensor
        ],
        "pca": {"models": model_pca(total), "rows": rows_pca(samples, m)},
    }
    report["worst"] = worst_groups(group_rows, m)
    report["verdict"] = verdict_line(report)
    return report


def non_finite_problems(spec: Inputs, per_tensor: list[tuple[Job, Sums]]) -> list[compat.Problem]:
    """An error for each input with a tensor that holds NaN or Inf (its sums are not finite): every
    figure of that tensor is meaningless, and a merge refuses it."""
    first: dict[str, str] = {}
    for job, s in per_tensor:
        if not math.isfinite(s.bb):
            first.setdefault(spec.base, job.name)
            continue
        for i, ref in enumerate(spec.models):
            if not math.isfinite(float(s.gram[i, i])):
                first.setdefault(ref, job.name)
    return [
        compat.Problem(
            "error", "non_finite", ref, f"model {ref!r}: tensor {name!r} holds NaN or Inf; a merge refuses it"
        )
        for ref, name in first.items()
    ]


def base_distance(per_tensor: list[tuple[Job, Sums]], i: int) -> float | None:
    """Model i's distance to the base: the median, over the weight matrices it changed, of
    ||tau_t|| / ||base_t||. Per matrix, so that norm weights (values near 1, which dominate the norm of a
    small model) and one rewritten embedding do not decide it; over the changed ones, so that a fine-tune
    of some modules only (the skill experts: MLPs) is measured where it moved. 0 when nothing changed."""
    ratios = []
    for job, s in per_tensor:
        tt = float(s.gram[i, i])
        if len(job.info.shape) == 2 and tt > 0 and s.bb > 0:
            ratios.append(math.sqrt(tt / s.bb))
    return _r(float(np.median(ratios))) if ratios else (0.0 if per_tensor else None)


def conflict_score(row: dict[str, Any], m: int) -> float:
    """How much the task vectors fight in a group. Under TIES, the largest share of a task vector's mass
    the sign election throws away there (what the merge loses); otherwise the largest pairwise
    sign-conflict share, weighted by how much of the base the vectors move there (a conflict among
    vanishing vectors costs nothing)."""
    lost = (row["method"] or {}).get("ties_sign_lost_mass")
    if lost is not None:
        return max((x for x in lost if x is not None), default=0.0)
    pairs = [row["sign_conflict"][i][k] for i in range(m) for k in range(i + 1, m)]
    pairs = [p for p in pairs if p is not None]
    rel = [r for r in row["relative_norm"] if r is not None]
    if not pairs or not rel:
        return 0.0
    return max(pairs) * min(1.0, sum(rel) / len(rel) / 0.01)


def worst_groups(rows: list[dict[str, Any]], m: int) -> list[dict[str, str]]:
    """Groups, most conflicted first (see conflict_score); single-model inspections by relative norm."""
    if m >= 2:
        key = lambda r: conflict_score(r, m)  # noqa: E731
    else:
        key = lambda r: max((x for x in r["relative_norm"] if x is not None), default=0.0)  # noqa: E731
    ranked = sorted(rows, key=key, reverse=True)
    return [{"layer": r["layer"], "module": r["module"], "score": _r(key(r))} for r in ranked]


def _r(x: float) -> float:
    return float(f"{x:.6g}")


def verdict_line(report: dict[str, Any]) -> str:
    c = report["compatibility"]
    words = [c["verdict"]]
    errors = [p for p in c["problems"] if p["severity"] == "error"]
    if errors:
        words.append(f"{len(errors)} problem(s), first: {errors[0]['message']}")
    m = len(report["models"])
    t = report["totals"]
    if m >= 2:
        cos = [t["cosine"][i][k] for i in range(m) for k in range(i + 1, m) if t["cosine"][i][k] is not None]
        conf = [t["sign_conflict"][i][k] for i in range(m) for k in range(i + 1, m)]
        conf = [x for x in conf if x is not None]
        if cos:
            words.append(f"task-vector cosines {min(cos):.2f} to {max(cos):.2f}")
        if conf:
            words.append(f"sign conflicts {min(conf):.2f} to {max(conf):.2f} (0.5: as unrelated as noise)")
        if report["worst"] and report["worst"][0]["score"] > 0:
            w = report["worst"][0]
            group = next(
                g for g in report["groups"] if (g["layer"], g["module"]) == (w["layer"], w["module"])
            )
            lost = (group["method"] or {}).get("ties_sign_lost_mass")
            if lost is not None:
                i = max(range(m), key=lambda k: lost[k] or 0.0)
                words.append(
                    f"TIES's sign election drops most in {w['layer']} {w['module']} "
                    f"({short(report['models'][i])}: {lost[i]:.2f} of its mass)"
                )
            else:
                words.append(f"most sign conflict in {w['layer']} {w['module']}")
    merged = t.get("merged")
    if merged:
        surv = ", ".join(
            f"{short(ref)} {x:.2f}" for ref, x in zip(report["models"], merged["survival"]) if x is not None
        )
        words.append(f"survival {surv}")
    return "; ".join(words)


def model_pca(total: Sums) -> dict[str, Any] | None:
    """Exact 2-D PCA of the whole task vectors and the base (the origin), from their Gram matrix
    (classical scaling): no vector is held, every product was summed while streaming."""
    m = total.m
    g = np.zeros((m + 1, m + 1))
    for i in range(m):
        for k in range(i, m):
            g[i + 1, k + 1] = g[k + 1, i + 1] = float(total.gram[i, k])
    n = m + 1
    j = np.eye(n) - np.full((n, n), 1.0 / n)
    centred = j @ g @ j
    values, vectors = np.linalg.eigh(centred)
    order = np.argsort(values)[::-1][:2]
    values = np.clip(values[order], 0.0, None)
    coords = vectors[:, order] * np.sqrt(values)
    if coords.shape[1] < 2:
        coords = np.pad(coords, ((0, 0), (0, 2 - coords.shape[1])))
    spread = float(np.clip(np.linalg.eigvalsh(centred), 0.0, None).sum())
    return {
        "points": [
            {"x": _r(float(x)), "y": _r(float(y))} for x, y in coords[:, :2]
        ],  # base first, then models
        "explained": [_r(float(v) / spread) if spread > 0 else 0.0 for v in values]
        + [0.0] * (2 - len(values)),
    }


def top_components(x: np.ndarray, k: int, iterations: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` leading principal directions of the rows of ``x`` (columns of the result) and their
    singular values, by seeded subspace iteration: a full SVD of a thousand rows of a thousand values takes
    seconds on a busy CPU, this a few milliseconds."""
    width = min(k + 8, *x.shape)
    q = np.random.default_rng(0).standard_normal((x.shape[1], width))
    for _ in range(iterations):
        q, _ = np.linalg.qr(x.T @ (x @ q))
    _, sv, vt = np.linalg.svd(x @ q, full_matrices=False)
    return (q @ vt.T)[:, :k], sv[:k]


def rows_pca(samples: list[RowSample], m: int) -> dict[str, Any] | None:
    """2-D PCA of sampled task-vector rows: each sampled row of each model is a point; each row position
    is scaled by the mean norm of its models' rows, so that positions weigh alike while the models'
    differences at one position are kept. Agreeing models' points fall together, fighting ones apart."""
    if not samples:
        return None
    vecs, meta = [], []
    for s in samples:
        scale = float(np.mean(np.linalg.norm(s.values.astype(np.float64), axis=1)))
        if scale <= 0:
            continue
        for i in range(m):
            vecs.append(s.values[i].astype(np.float64) / scale)
            meta.append((i, s.tensor, s.row, s.layer, s.module))
    if len(vecs) < 3:
        return None
    x = np.stack(vecs)
    x -= x.mean(axis=0)
    components, sv = top_components(x, 2)
    coords = x @ components
    energy = float((x * x).sum())
    return {
        "explained": [_r(float(v**2) / energy) if energy > 0 else 0.0 for v in sv],
        "points": [
            {
                "model": i,
                "tensor": t,
                "row": r,
                "layer": lay,
                "module": mod,
                "x": _r(float(a)),
                "y": _r(float(b)),
            }
            for (i, t, r, lay, mod), (a, b) in zip(meta, coords)
        ],
    }
