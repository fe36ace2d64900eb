"""Config + models -> the plan: one small frozen record per output tensor. Pure: reads only headers.

Every check that can be made without tensor data is made here (missing tensors, shapes, layer ranges,
vocabulary sizes, dtypes, parameters), so a bad merge fails before anything is written.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from mergesmith.core import dtypes
from mergesmith.core.arch import (
    Layout,
    Stack,
    expert_group,
    get_nested,
    is_embedding,
    set_nested,
    tie_word_embeddings,
)
from mergesmith.core.dtypes import dtype_name, parse_code
from mergesmith.core.errors import ConfigError, MergeError
from mergesmith.core.hf_load import drop_remote_code
from mergesmith.core.layer_config import count_from_fields, rewrite_layer_fields
from mergesmith.core.model import ModelSource, TensorInfo
from mergesmith.core.sources import open_source
from mergesmith.core.vocab import VocabPlan, wrap_sources
from mergesmith.methods import BaseRule, Method, all_parameter_names, get_method
from mergesmith.pipeline.compat import apply_extensions
from mergesmith.pipeline.config import MergeConfig, Parameters, did_you_mean
from mergesmith.pipeline.params import layer_position, resolve
from mergesmith.pipeline.vocab import plan_vocab, rewrite_token_ids, set_vocab_size, token_refs

if TYPE_CHECKING:
    import torch

log = logging.getLogger("mergesmith")


@dataclass(frozen=True)
class TensorSource:
    model: str  # reference of the model, a key of MergePlan.models
    tensor: str  # the tensor's name inside that model


@dataclass(frozen=True)
class OutputTensor:
    """Everything the executor needs to produce one output tensor.


    Dtypes are safetensors codes ('BF16'); the ``*_dtype`` properties give torch dtypes.
    """

    name: str
    shape: tuple[int, ...]
    out_code: str
    method: str
    base: TensorSource | None
    inputs: tuple[TensorSource, ...]
    params: tuple[tuple[str, Any], ...]
    cast_code: str | None  # config `dtype`: inputs are rounded to it before the maths
    compute_code: str
    copy: bool = False  # a verbatim byte copy of one input (passthrough, same dtype, no scale)
    # per-expert MoE tensors merged as one, as the fused tensor transformers 5 makes of them (expert_group):
    # the fused tensor's name on every member; the members themselves on the unit that merges them
    group: str | None = None
    parts: tuple[OutputTensor, ...] = ()

    @property
    def out_dtype(self) -> torch.dtype:
        return dtypes.torch_dtype(self.out_code)

    @property
    def cast_dtype(self) -> torch.dtype | None:
        return None if self.cast_code is None else dtypes.torch_dtype(self.cast_code)

    @property
    def compute_dtype(self) -> torch.dtype:
        return dtypes.torch_dtype(self.compute_code)

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * dtypes.itemsize(self.out_code)

    @property
    def sources(self) -> tuple[TensorSource, ...]:
        return ((self.base,) if self.base is not None else ()) + self.inputs

    def describe(self) -> str:
        params = " ".join(f"{k}={_fmt(v)}" for k, v in self.params)
        base = f" base={self.base.model}:{self.base.tensor}" if self.base else ""
        inputs = " ".join(f"{s.model}:{s.tensor}" for s in self.inputs)
        how = "copy" if self.copy else self.method
        shape = "x".join(str(d) for d in self.shape)
        group = f" (merged as one with {self.group})" if self.group else ""
        return f"{self.name} [{shape} {dtype_name(self.out_code)}] {how} {params}{base} <- {inputs}{group}".replace(
            "  ", " "
        )


def _fmt(v: Any) -> str:
    if isinstance(v, tuple):
        return "[" + ",".join(_fmt(x) for x in v) + "]"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


@dataclass
class _Source:
    model: str
    start: int
    end: int
    params: Parameters | None


@dataclass
class _Slice:
    sources: list[_Source]
    base: str | None
    params: Parameters | None

    @property
    def length(self) -> int:
        return self.sources[0].end - self.sources[0].start


@dataclass
class MergePlan:
    config: MergeConfig
    method: Method
    tensors: list[OutputTensor]
    models: dict[str, ModelSource]
    out_config: dict
    config_model: str  # the model whose config.json, generation config and layout the output takes
    tokenizer_model: str
    base_model: str | None
    num_layers: int
    warnings: list[str] = field(default_factory=list)
    vocab: VocabPlan | None = None  # the output vocabulary when models' rows are re-indexed to it

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    def close(self) -> None:
        for m in self.models.values():
            m.close()


class Warnings(list[str]):
    """The plan's warnings (each once); under ``strict`` the first one is raised as a ConfigError."""

    def __init__(self, strict: bool = False):
        super().__init__()
        self.strict = strict

    def __call__(self, message: str) -> None:
        if self.strict:
            raise ConfigError(f"{message} (an error under --strict)")
        if message not in self:
            self.append(message)


def build_plan(
    config: MergeConfig,
    models: dict[str, ModelSource] | None = None,
    *,
    allow_crimes: bool = False,
    strict: bool = False,
    mergekit_compat: bool = False,
    per_expert: bool = False,
) -> MergePlan:
    """Plan every output tensor. ``allow_crimes`` merges models of different architectures, copying a
    tensor that only some models have from one that has it; ``strict`` makes every warning an error;
    ``mergekit_compat`` leaves out mergesmith's extensions of mergekit's methods (pipeline/compat.py);
    ``per_expert`` merges per-expert MoE tensors each on its own instead of as the fused tensor that
    transformers 5 and mergekit make of them (:func:`group_experts`)."""
    method = get_method(config.merge_method)
    warn = Warnings(strict)
    for message in config._read_warnings:
        warn(message)
    _check_parameter_names(config, method, warn)
    slices = _normalise_slices(config, method)
    if not slices:
        raise ConfigError("'slices' is empty; give at least one slice with its sources")
    refs = _unique(
        [s.model for sl in slices for s in sl.sources] + ([config.base_model] if config.base_model else [])
    )
    inputs = list(refs)
    tok = config.tokenizer_choice
    if tok not in ("base", "union") and tok not in refs:
        refs.append(tok)
    refs = _unique(refs + token_refs(config))
    models = dict(models or {})
    for ref in refs:
        if ref not in models:
            models[ref] = open_source(ref)
    _check_architectures(inputs, models, allow_crimes)
    config_model = config.base_model or slices[0].sources[0].model
    # models with different tokenizers: every input's vocabulary rows are read in the output's order
    vocab = plan_vocab(config, inputs, models, config_model)
    if vocab is not None:
        models = wrap_sources(models, vocab)
    layouts = {ref: Layout.infer(ref, list(models[ref].tensors), models[ref].config) for ref in refs}
    _fill_ranges(slices, layouts)
    _check_slices(slices, method)

    out_config = copy.deepcopy(models[config_model].config)
    if vocab is not None:
        set_vocab_size(out_config, vocab.rows)
        if tok not in ("base", "union"):
            rewrite_token_ids(out_config, vocab.vocabs[config_model], vocab.vocab)
    out_tied = tie_word_embeddings(out_config) and not any(
        n.endswith("lm_head.weight") for n in models[config_model].tensors
    )
    planner = _Planner(config, method, models, layouts, allow_crimes)
    tensors: list[OutputTensor] = []
    first, last = slices[0], slices[-1]
    # the input side (embeddings, towers, projectors) comes from the first slice's models; a tower layer's
    # gradient position is its position in its own tower
    first_layout = layouts[_name_model(first, config_model)]
    for name in _names(first, config_model, layouts, lambda lay: lay.pre):
        pos = first_layout.position(name)
        tensors.append(planner.plan_tensor(name, first, {s.model: name for s in first.sources}, pos))
    offset = 0
    for sl in slices:
        out_stack = layouts[_name_model(sl, config_model)].decoder
        for j in range(sl.length):
            pos = layer_position(j, sl.length)
            # each layer's own tensors: those of the source layers this output layer takes
            for suffix in _layer_suffixes(sl, config_model, layouts, j):
                assert out_stack is not None
                names = {s.model: _decoder(layouts, s.model).name(s.start + j, suffix) for s in sl.sources}
                out_name = out_stack.name(offset + j, suffix)
                tensors.append(planner.plan_tensor(out_name, sl, names, pos))
        offset += sl.length
    for name in _names(last, config_model, layouts, lambda lay: lay.post):
        if out_tied and name.endswith("lm_head.weight"):
            continue
        tensors.append(planner.plan_tensor(name, last, {s.model: name for s in last.sources}, 0.0))
    planner.report_carried(warn)
    tensors = apply_extensions(tensors, method, mergekit_compat, warn)
    if not per_expert:
        tensors = group_experts(tensors, models)

    _rewrite_config(out_config, slices, layouts[config_model], offset, tensors)
    remote = drop_remote_code(out_config, config_model)
    if remote:
        warn.append(remote)  # not an error under --strict: the output is still what was asked
    tokenizer_model = config_model if tok in ("base", "union") else tok
    return MergePlan(
        config=config,
        method=method,
        tensors=tensors,
        models=models,
        out_config=out_config,
        config_model=config_model,
        tokenizer_model=tokenizer_model,
        base_model=config.base_model,
        num_layers=offset,
        warnings=list(warn),
        vocab=vocab,
    )


def group_experts(tensors: list[OutputTensor], models: dict[str, ModelSource]) -> list[OutputTensor]:
    """Mark per-expert MoE tensors (``...experts.N.w1.weight``) to be merged as one: the fused tensor that
    transformers 5 makes of them (every expert's w1 and w3, or gate_proj and up_proj, in one; w2 or
    down_proj in another), which is the tensor mergekit 0.1.5 merges, so that a whole-tensor statistic (TIES's
    top-k, a norm) is taken over the same elements as there. Each member is still written under its own
    name. Members that differ in anything but their data (parameters set per expert by a filter, dtypes,
    shapes of a row) are left on their own, and so are those of methods that work per matrix (SVD)."""
    members: dict[str, list[OutputTensor]] = {}
    for t in tensors:
        found = expert_group(t.name)
        # a method that works on whole matrices (SVD: tsv, iso_c) is not chunkable, and an expert's matrix
        # is a matrix of its own: stacked experts are none
        chunkable = get_method(t.method).chunkable
        if found is not None and not t.copy and t.method != "passthrough" and len(t.shape) == 2 and chunkable:
            members.setdefault(found[0], []).append(t)

    def alike(t: OutputTensor) -> tuple:
        codes = tuple(models[s.model].tensors[s.tensor].code for s in t.sources)
        return (
            t.method,
            repr(t.params),
            t.base.model if t.base else None,
            tuple(s.model for s in t.inputs),
            t.out_code,
            t.cast_code,
            t.compute_code,
            t.shape[1:],
            codes,
        )

    grouped = {
        t.name: key
        for key, ts in members.items()
        if len(ts) > 1 and len({alike(t) for t in ts}) == 1
        for t in ts
    }
    if not grouped:
        return tensors
    return [dataclasses.replace(t, group=grouped[t.name]) if t.name in grouped else t for t in tensors]


def merge_units(tensors: Sequence[OutputTensor]) -> list[OutputTensor]:
    """What the executor merges: every tensor on its own, except the members of a group (``group``), merged
    as one tensor with their rows one after another in the fused order (expert by expert; w1 before w3),
    in the place of the first member. Its ``parts`` are the members, each written under its own name."""
    groups: dict[str, list[OutputTensor]] = {}
    for t in tensors:
        if t.group is not None:
            groups.setdefault(t.group, []).append(t)
    units: list[OutputTensor] = []
    for t in tensors:
        if t.group is None:
            units.append(t)
        elif t is groups[t.group][0]:
            parts = sorted(groups[t.group], key=lambda p: expert_group(p.name)[1])  # type: ignore[index]
            rows = sum(p.shape[0] for p in parts)
            units.append(dataclasses.replace(t, name=t.group, shape=(rows, *t.shape[1:]), parts=tuple(parts)))
    return units


def _unique(items: Sequence[str]) -> list[str]:
    return list(dict.fromkeys(items))


def _name_model(sl: _Slice, preferred: str) -> str:
    """The model whose tensor names a slice's output follows: the preferred one if it is in the slice."""
    models = [s.model for s in sl.sources]
    return preferred if preferred in models else (sl.base if sl.base in models else models[0])


def _names(sl: _Slice, preferred: str, layouts: dict[str, Layout], part) -> list[str]:
    """The names (or layer templates) ``part`` of a layout gives, over every model of the slice: the
    naming model's first, in its order, then those only other models have (they are not dropped)."""
    first = _name_model(sl, preferred)
    return _unique([*part(layouts[first]), *(n for s in sl.sources for n in part(layouts[s.model]))])


def _decoder(layouts: dict[str, Layout], ref: str) -> Stack:
    stack = layouts[ref].decoder
    assert stack is not None  # a slice with layers has models with a decoder
    return stack


def _layer_suffixes(sl: _Slice, preferred: str, layouts: dict[str, Layout], j: int) -> list[str]:
    """The tensor names (after ``<stack>.<N>.``) of the slice's ``j``-th layer, over every model of the slice:
    the naming model's first, in its order, then those only other models' layers have."""
    first = _name_model(sl, preferred)
    order = [first] + [s.model for s in sl.sources if s.model != first]
    start = {s.model: s.start for s in sl.sources}
    return _unique([x for ref in order for x in _decoder(layouts, ref).layers[start[ref] + j]])


def _check_parameter_names(config: MergeConfig, method: Method, warn: Warnings) -> None:
    """A name no method takes is an error. A name this method does not read where it is written is ignored,
    as mergekit ignores it, with a warning that says where it belongs."""
    known_any = all_parameter_names()
    name = method.name

    def check(params: Parameters | None, where: str, level: str) -> None:
        for key in params or {}:
            spec = method.param_index.get(key)
            if spec is None and key == "random_seed":
                warn(
                    f"parameter 'random_seed' {where} is ignored, as mergekit ignores it: the seed is not a "
                    "merge parameter; pass --random-seed N (random_seed=N in mergesmith.merge)"
                )
            elif spec is None:
                takes = ", ".join(method.param_index) or "no parameters"
                if key not in known_any:
                    hint = did_you_mean(key, method.param_index) or did_you_mean(key, known_any)
                    raise ConfigError(
                        f"parameter {key!r} {where} is not a parameter of any merge method{hint} "
                        f"({name} takes: {takes})"
                    )
                warn(
                    f"parameter {key!r} {where} is ignored: merge_method {name!r} does not take it "
                    f"(it takes: {takes}){did_you_mean(key, method.param_index)}"
                )
            elif not spec.per_model and level != "all":
                warn(
                    f"parameter {key!r} {where} is ignored: {name} reads {key!r} once per tensor, not per "
                    "model; it belongs under the top-level `parameters` (or a slice's)"
                )
            elif level == "base":
                warn(
                    f"parameter {key!r} {where} is ignored: {name} takes per-model parameters from the "
                    "models merged into the base model, not from the base model itself"
                )

    def level(model: str, base: str | None) -> str:
        separate = method.base == BaseRule.REQUIRED or (method.base == BaseRule.OPTIONAL and bool(base))
        return "base" if separate and model == base else "model"

    check(config.parameters, "in top-level parameters", "all")
    for m in config.models or []:
        lv = level(m.model, config.base_model)
        check(m.parameters, f"of {'base ' if lv == 'base' else ''}model {m.model!r}", lv)
    for i, sl in enumerate(config.slices or []):
        check(sl.parameters, f"of slice {i}", "all")
        for s in sl.sources:
            lv = level(s.model, sl.base_model or config.base_model)
            check(s.parameters, f"of {'base ' if lv == 'base' else ''}model {s.model!r} in slice {i}", lv)


def _architecture(config: dict) -> tuple[str | None, tuple[str, ...] | None]:
    arch = config.get("architectures")
    return config.get("model_type"), tuple(arch) if isinstance(arch, list) and arch else None


def _check_architectures(refs: Sequence[str], models: dict[str, ModelSource], allow_crimes: bool) -> None:
    """Models whose config.json disagree on model_type or architectures are an error unless the user opts
    in (mergekit's --allow-crimes): their tensors may line up by name and shape and still mean different
    things."""
    kinds = {ref: _architecture(models[ref].config) for ref in refs}
    types = {k[0] for k in kinds.values() if k[0] is not None}
    archs = {k[1] for k in kinds.values() if k[1] is not None}
    if len(types) <= 1 and len(archs) <= 1:
        return
    seen: dict[tuple, str] = {}
    for ref, kind in kinds.items():
        seen.setdefault(kind, ref)
    detail = ", ".join(
        f"{ref!r} is {'/'.join(arch or ('?',))} (model_type {mtype or '?'})"
        for (mtype, arch), ref in seen.items()
    )
    if allow_crimes:
        log.info("merging models of different architectures (--allow-crimes): %s", detail)
        return
    raise MergeError(
        f"the models are of different architectures: {detail}; the result may not load or work. Merge "
        "models of one architecture, or pass --allow-crimes (allow_crimes=True) to merge them anyway"
    )


def _normalise_slices(config: MergeConfig, method: Method) -> list[_Slice]:
    if config.models is not None:
        sources = [_Source(m.model, 0, -1, m.parameters) for m in config.models]
        if (
            config.base_model
            and config.base_model not in [s.model for s in sources]
            and method.base != BaseRule.NONE
        ):
            sources.append(_Source(config.base_model, 0, -1, None))
        return [_Slice(sources, config.base_model, None)]
    out = []
    for sl in config.slices or []:
        srcs = [
            _Source(s.model, *(s.layer_range if s.layer_range else (0, -1)), s.parameters) for s in sl.sources
        ]
        out.append(_Slice(srcs, sl.base_model or config.base_model, sl.parameters))
    return out


def _fill_ranges(slices: list[_Slice], layouts: dict[str, Layout]) -> None:
    for i, sl in enumerate(slices):
        for s in sl.sources:
            n = layouts[s.model].num_layers
            if s.end == -1:
                s.end = n
            if s.end > n:
                raise ConfigError(
                    f"slice {i}: layer_range [{s.start}, {s.end}] of model {s.model!r} is outside its {n} layers"
                )


def _check_slices(slices: list[_Slice], method: Method) -> None:
    for i, sl in enumerate(slices):
        lengths = {s.model: s.end - s.start for s in sl.sources}
        if len(set(lengths.values())) > 1:
            detail = ", ".join(f"{m}: {n}" for m, n in lengths.items())
            raise ConfigError(f"slice {i}: every source must cover the same number of layers ({detail})")
        models = [s.model for s in sl.sources]
        repeated = sorted({m for m in models if models.count(m) > 1})
        if repeated:
            raise ConfigError(
                f"slice {i}: model {repeated[0]!r} is listed {models.count(repeated[0])} times; list each model "
                "once (give it a larger weight to count it more)"
            )
        if method.base == BaseRule.REQUIRED and not sl.base:
            raise ConfigError(f"merge_method {method.name!r} needs a base_model")
        if _separate_base(method, sl):
            if sl.base not in models:
                raise ConfigError(f"slice {i}: base_model {sl.base!r} must be one of the slice's sources")
            n_other = len(models) - 1
        else:
            n_other = len(models)
        if n_other < method.min_models:
            raise ConfigError(
                f"merge_method {method.name!r} needs at least {method.min_models} model(s) besides the base, "
                f"slice {i} has {n_other}"
            )
        if method.max_models is not None and n_other > method.max_models:
            what = "model per slice" if method.base == BaseRule.NONE else "model(s) besides the base"
            raise ConfigError(
                f"merge_method {method.name!r} takes at most {method.max_models} {what}, slice {i} has {n_other}"
            )


def _separate_base(method: Method, sl: _Slice) -> bool:
    """Whether the slice's base model is the reference point rather than one of the inputs."""
    return method.base == BaseRule.REQUIRED or (method.base == BaseRule.OPTIONAL and bool(sl.base))


class _Planner:
    def __init__(
        self, config: MergeConfig, method: Method, models: dict[str, ModelSource], layouts, allow_crimes: bool
    ):
        self.config = config
        self.method = method
        self.models = models
        self.layouts = layouts
        self.allow_crimes = allow_crimes
        self.cast = parse_code(config.dtype, "dtype")
        self.out = parse_code(config.out_dtype, "out_dtype")
        # (models that have the tensor, models that lack it, the model it is copied from) -> tensor names
        self.carried: dict[tuple[tuple[str, ...], tuple[str, ...], str], list[str]] = {}

    def _find(self, ref: str, name: str) -> TensorInfo | None:
        model = self.models[ref]
        info = model.tensors.get(name)
        if info is None and name.endswith("lm_head.weight") and tie_word_embeddings(model.config):
            embed = [
                n for n in self.layouts[ref].pre if is_embedding(n) and n.endswith("embed_tokens.weight")
            ]
            embed = embed or [n for n in self.layouts[ref].pre if is_embedding(n)]
            if embed:
                info = model.tensors[embed[0]]
        return info

    def plan_tensor(self, out_name: str, sl: _Slice, names: dict[str, str], position: float) -> OutputTensor:
        method = self.method
        base_ref = sl.base if _separate_base(method, sl) else None
        others = [s for s in sl.sources if s.model != base_ref]
        found = {s.model: self._find(s.model, names[s.model]) for s in sl.sources}
        have = [ref for ref, info in found.items() if info is not None]
        lack = [ref for ref, info in found.items() if info is None]
        if lack:
            return self._carry(out_name, have, lack, base_ref, found, names)
        infos: dict[str, TensorInfo] = {ref: info for ref, info in found.items() if info is not None}
        # the aliased lm_head of a tied model is read under its embedding name
        src = {ref: TensorSource(ref, infos[ref].name) for ref in infos}
        self._check_shapes(out_name, infos)
        shape = next(iter(infos.values())).shape
        in_dtypes = {i.code for i in infos.values()}
        if in_dtypes.isdisjoint(dtypes.FLOAT_CODES) and len(in_dtypes) == 1:
            # integer tensors (a routing table, an index map) are not merged and not cast: they pass through
            # as stored, from the base model or the first model
            ref = base_ref or others[0].model
            return self._verbatim(out_name, src[ref], infos[ref])

        params: dict[str, Any] = {}
        for spec in method.params:
            if spec.per_model:
                vals = []
                for s in others:
                    levels = [s.params, sl.params, self.config.parameters]
                    where = f"of model {s.model!r} for tensor {names[s.model]}"
                    hint = "; set it under that model's `parameters` (or the top-level ones, for every model)"
                    vals.append(resolve(spec, levels, names[s.model], position, where, hint))
                params[spec.name] = tuple(vals)
            else:
                levels = [sl.params, self.config.parameters]
                hint = _misplaced_hint(spec.name, method.name, sl)
                params[spec.name] = resolve(spec, levels, out_name, position, f"for tensor {out_name}", hint)
        try:
            method.kernel.check_params(params)
        except MergeError as e:
            raise ConfigError(f"tensor {out_name}: {e}") from None

        compute = "F64" if (self.cast == "F64" or (self.cast is None and "F64" in in_dtypes)) else "F32"
        out_dtype = self.out or self.cast or (next(iter(in_dtypes)) if len(in_dtypes) == 1 else "F32")
        only = infos[others[0].model]
        scale = params.get("scale", (None,))[0]
        copy_bytes = (
            method.base == BaseRule.NONE
            and (scale is None or scale == 1.0)
            and only.code == out_dtype
            and (self.cast is None or self.cast == out_dtype)
        )
        if not copy_bytes:
            for ref, info in infos.items():
                if info.code not in dtypes.FLOAT_CODES:
                    raise MergeError(
                        f"model {ref!r}: tensor {info.name!r} has dtype {dtype_name(info.code)}; "
                        f"merge_method {method.name!r} needs floating-point tensors"
                    )
        elif only.code not in dtypes.FLOAT_CODES:
            out_dtype = only.code
        return OutputTensor(
            name=out_name,
            shape=shape,
            out_code=out_dtype,
            method=method.name,
            base=src[base_ref] if base_ref else None,
            inputs=tuple(src[s.model] for s in others),
            params=tuple(params.items()),
            cast_code=self.cast,
            compute_code=compute,
            copy=copy_bytes,
        )

    def _carry(
        self,
        out_name: str,
        have: list[str],
        lack: list[str],
        base_ref: str | None,
        found: dict[str, TensorInfo | None],
        names: dict[str, str],
    ) -> OutputTensor:
        """A tensor that only some models have: an error, or with --allow-crimes a copy of it from the
        base model if it has it, else from the first model that does (never dropped silently)."""
        if not self.allow_crimes:
            if len(set(names.values())) > 1:  # a slice that pairs different layers of its models
                raise MergeError(
                    f"model {lack[0]!r} has no tensor {names[lack[0]]!r}, which {have[0]!r} has as "
                    f"{names[have[0]]!r} (output tensor {out_name!r}): the slice pairs layers of different kinds; "
                    "choose layer ranges that pair layers holding the same tensors, or pass --allow-crimes to "
                    "copy it from the model that has it"
                )
            if ".experts." in out_name and self._expert_layouts_differ(have + lack):
                raise MergeError(
                    f"tensor {out_name!r} is in {_refs(have)} but not in {_refs(lack)}: these models store their "
                    "MoE experts in different layouts (one fused tensor per layer, experts.gate_up_proj, in some; "
                    "a tensor per expert, experts.N..., in others); give them one layout (transformers' "
                    "save_pretrained writes the per-expert one) and merge again"
                )
            raise MergeError(
                f"tensor {out_name!r} is in {_refs(have)} but not in {_refs(lack)}; merge models that have "
                "the same tensors, or pass --allow-crimes to copy it from the model that has it"
            )
        ref = base_ref if base_ref in have else have[0]
        info = found[ref]
        assert info is not None
        self.carried.setdefault((tuple(have), tuple(lack), ref), []).append(out_name)
        out = self.out or self.cast or info.code
        if info.code not in dtypes.FLOAT_CODES:
            out = info.code
        return OutputTensor(
            name=out_name,
            shape=info.shape,
            out_code=out,
            method="passthrough",
            base=None,
            inputs=(TensorSource(ref, info.name),),
            params=(("scale", (None,)),),
            cast_code=self.cast if info.code in dtypes.FLOAT_CODES else None,
            compute_code="F64" if "F64" in (self.cast, info.code) else "F32",
            copy=out == info.code and self.cast in (None, info.code),
        )

    def _expert_layouts_differ(self, refs: list[str]) -> bool:
        """Whether some of the models store MoE experts per expert and others do not."""
        per_expert = {any(expert_group(n) for n in self.models[ref].tensors) for ref in refs}
        return len(per_expert) > 1

    @staticmethod
    def _verbatim(out_name: str, source: TensorSource, info: TensorInfo) -> OutputTensor:
        return OutputTensor(
            name=out_name,
            shape=info.shape,
            out_code=info.code,
            method="passthrough",
            base=None,
            inputs=(source,),
            params=(("scale", (None,)),),
            cast_code=None,
            compute_code="F32",
            copy=True,
        )

    def report_carried(self, warn: Warnings) -> None:
        for (have, lack, source), names in self.carried.items():
            shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
            warn(
                f"{len(names)} tensor(s) are in {_refs(have)} but not in {_refs(lack)} ({shown}); copied "
                f"unmerged from {source!r} (--allow-crimes)"
            )

    def _check_shapes(self, out_name: str, infos: dict[str, TensorInfo]) -> None:
        shapes = {ref: info.shape for ref, info in infos.items()}
        if len(set(shapes.values())) <= 1:
            return
        detail = ", ".join(f"{ref}: {list(s)}" for ref, s in shapes.items())
        rows = {s[0] for s in shapes.values() if s}
        rest = {s[1:] for s in shapes.values()}
        if is_embedding(out_name) and len(rows) > 1 and len(rest) == 1:
            raise MergeError(
                f"tensor {out_name!r}: vocabulary sizes differ ({detail}); the models use different tokenizers "
                "or padded vocabularies; set tokenizer_source (union, base or a model) to re-index every model's "
                "rows to one tokenizer (docs/config.md, Tokenizers), or merge only models that share one"
            )
        differ = _config_differences({ref: self.models[ref].config for ref in infos})
        why = f"config.json differs: {differ}" if differ else "the models are not the same size"
        raise MergeError(
            f"tensor {out_name!r}: shapes differ between models ({detail}); {why}. Tensors can only be merged "
            "between models of the same architecture and size"
        )


SIZE_KEYS = (
    "hidden_size",
    "intermediate_size",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "vocab_size",
    "n_embd",
    "n_head",
    "n_inner",
)


def _config_differences(configs: dict[str, dict]) -> str:
    """``hidden_size 32 vs 48, ...``: the size keys of config.json whose values differ between models."""

    def value(config: dict, key: str) -> Any:
        text = config.get("text_config")
        return config[key] if key in config else text.get(key) if isinstance(text, dict) else None

    out = []
    for key in SIZE_KEYS:
        values = [value(c, key) for c in configs.values()]
        if len({repr(v) for v in values}) > 1:
            out.append(f"{key} " + " vs ".join(str(v) for v in values))
    return ", ".join(out)


def _refs(refs: Sequence[str]) -> str:
    return ", ".join(repr(r) for r in refs)


def _misplaced_hint(name: str, method: str, sl: _Slice) -> str:
    """For a missing per-tensor parameter: where it belongs, and where it was set instead if it was."""
    for s in sl.sources:
        if s.params and name in s.params:
            return (
                f"; {name!r} is set under model {s.model!r}, but {method} reads it once per tensor: move it "
                "to the top-level `parameters` (or the slice's)"
            )
    return f"; set it under the top-level `parameters` (e.g. `parameters: {{{name}: ...}}`)"


def _rewrite_config(
    out_config: dict, slices: list[_Slice], layout: Layout, total_layers: int, tensors
) -> None:
    """The output's config.json: the config model's, with the decoder's layer count and its per-layer fields
    following the layers the slices took (core/layer_config.py), and the dtype of the tensors written."""
    if layout.decoder is not None:
        source = [s.sources[0].start + j for s in slices for j in range(s.length)]
        key = layout.layer_key
        parent = key.rsplit(".", 1)[0] if key and "." in key else None
        container = get_nested(out_config, parent) if parent else out_config
        kinds = [layout.decoder.kind(i) for i in range(layout.decoder.depth)]
        rewrite_layer_fields(container, f"{parent}." if parent else "", source, kinds)
        if key:
            set_nested(out_config, key, total_layers)
        elif total_layers != layout.decoder.depth and count_from_fields(container) is None:
            raise MergeError(
                "config.json has no layer count that mergesmith knows (num_hidden_layers, n_layer, "
                "decoder_layers, ...) nor a per-layer list; it cannot write one for a passthrough of "
                f"{total_layers} layers"
            )
    floats = {t.out_code for t in tensors if t.out_code in dtypes.FLOAT_CODES}
    if floats:
        name = dtype_name(max(floats, key=dtypes.itemsize) if len(floats) > 1 else next(iter(floats)))
        out_config["dtype"] = name
        if "torch_dtype" in out_config:
            out_config["torch_dtype"] = name
    out_config.pop("_name_or_path", None)
