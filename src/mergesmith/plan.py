"""Config + models -> the plan: one small frozen record per output tensor. Pure: reads only headers.

Every check that can be made without tensor data is made here (missing tensors, shapes, layer ranges,
vocabulary sizes, dtypes, parameters), so a bad merge fails before anything is written.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from mergesmith import dtypes
from mergesmith.arch import (
    Layout,
    get_nested,
    is_embedding,
    set_nested,
    tie_word_embeddings,
)
from mergesmith.config import MergeConfig, Parameters
from mergesmith.errors import ConfigError, MergeError
from mergesmith.methods import BaseRule, Method, get_method
from mergesmith.model import ModelSource, TensorInfo
from mergesmith.params import layer_position, resolve
from mergesmith.sources import open_source

if TYPE_CHECKING:
    import torch

DTYPE_NAMES: dict[str, str] = {  # config spelling -> safetensors code
    "float32": "F32",
    "fp32": "F32",
    "float16": "F16",
    "fp16": "F16",
    "half": "F16",
    "bfloat16": "BF16",
    "bf16": "BF16",
    "float64": "F64",
    "fp64": "F64",
}


def parse_code(name: str | None, key: str) -> str | None:
    """A config's dtype name -> its safetensors code (None stays None)."""
    if name is None:
        return None
    cleaned = name.removeprefix("torch.").lower()
    try:
        return DTYPE_NAMES[cleaned]
    except KeyError:
        raise ConfigError(
            f"{key}: unknown dtype {name!r}; use float32, float16, bfloat16 or float64"
        ) from None


def parse_dtype(name: str | None, key: str) -> torch.dtype | None:
    """A config's dtype name -> torch dtype (imports torch)."""
    code = parse_code(name, key)
    return None if code is None else dtypes.torch_dtype(code)


def dtype_name(dtype) -> str:
    """'bfloat16' for torch.bfloat16 or 'BF16'."""
    return dtypes.name_of(dtypes.code_of(dtype))


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
        return f"{self.name} [{shape} {dtype_name(self.out_code)}] {how} {params}{base} <- {inputs}".replace(
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

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    def close(self) -> None:
        for m in self.models.values():
            m.close()


def build_plan(config: MergeConfig, models: dict[str, ModelSource] | None = None) -> MergePlan:
    method = get_method(config.merge_method)
    _check_parameter_names(config, method)
    slices = _normalise_slices(config, method)
    if not slices:
        raise ConfigError("'slices' is empty; give at least one slice with its sources")
    refs = _unique(
        [s.model for sl in slices for s in sl.sources] + ([config.base_model] if config.base_model else [])
    )
    tok = config.tokenizer_choice
    if tok not in ("base", "union") and tok not in refs:
        refs.append(tok)
    models = dict(models or {})
    for ref in refs:
        if ref not in models:
            models[ref] = open_source(ref)
    layouts = {ref: Layout.infer(ref, list(models[ref].tensors), models[ref].config) for ref in refs}
    _fill_ranges(slices, layouts)
    _check_slices(slices, layouts, method)

    config_model = config.base_model or slices[0].sources[0].model
    out_config = copy.deepcopy(models[config_model].config)
    out_tied = tie_word_embeddings(out_config) and not any(
        n.endswith("lm_head.weight") for n in models[config_model].tensors
    )
    planner = _Planner(config, method, models, layouts)
    tensors: list[OutputTensor] = []
    first, last = slices[0], slices[-1]
    ref_layout = layouts[_name_model(first, config_model)]
    for name in ref_layout.pre:
        tensors.append(planner.plan_tensor(name, first, {s.model: name for s in first.sources}, 0.0))
    offset = 0
    for sl in slices:
        lay = layouts[_name_model(sl, config_model)]
        for j in range(sl.length):
            pos = layer_position(j, sl.length)
            for template in lay.layer_templates:
                out_name = template.format(offset + j)
                names = {s.model: template.format(s.start + j) for s in sl.sources}
                tensors.append(planner.plan_tensor(out_name, sl, names, pos))
        offset += sl.length
    last_layout = layouts[_name_model(last, config_model)]
    for name in last_layout.post:
        if out_tied and name.endswith("lm_head.weight"):
            continue
        tensors.append(planner.plan_tensor(name, last, {s.model: name for s in last.sources}, 0.0))

    _rewrite_config(out_config, slices, layouts[config_model], offset, tensors, config)
    remote = drop_remote_code(out_config, config_model)
    if remote:
        planner.warnings.append(remote)
    tokenizer_model = config_model if tok == "base" else tok
    if tok == "union":
        raise ConfigError("tokenizer source 'union' is not supported yet; use 'base' or a model path")
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
        warnings=planner.warnings,
    )


def _unique(items: Sequence[str]) -> list[str]:
    return list(dict.fromkeys(items))


def _name_model(sl: _Slice, preferred: str) -> str:
    """The model whose tensor names a slice's output follows: the preferred one if it is in the slice."""
    models = [s.model for s in sl.sources]
    return preferred if preferred in models else (sl.base if sl.base in models else models[0])


def _check_parameter_names(config: MergeConfig, method: Method) -> None:
    def check(params: Parameters | None, where: str) -> None:
        for key in params or {}:
            if key not in method.param_index:
                known = ", ".join(method.param_index) or "none"
                raise ConfigError(
                    f"parameter {key!r} {where} is not a parameter of merge_method {method.name!r} (it takes: {known})"
                )

    check(config.parameters, "in top-level parameters")
    for m in config.models or []:
        check(m.parameters, f"of model {m.model!r}")
    for i, sl in enumerate(config.slices or []):
        check(sl.parameters, f"of slice {i}")
        for s in sl.sources:
            check(s.parameters, f"of model {s.model!r} in slice {i}")


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


def _check_slices(slices: list[_Slice], layouts: dict[str, Layout], method: Method) -> None:
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
    def __init__(self, config: MergeConfig, method: Method, models: dict[str, ModelSource], layouts):
        self.config = config
        self.method = method
        self.models = models
        self.layouts = layouts
        self.cast = parse_code(config.dtype, "dtype")
        self.out = parse_code(config.out_dtype, "out_dtype")
        self.warnings: list[str] = []

    def _info(self, ref: str, name: str) -> TensorInfo:
        model = self.models[ref]
        info = model.tensors.get(name)
        if info is None and name.endswith("lm_head.weight") and tie_word_embeddings(model.config):
            embed = [
                n for n in self.layouts[ref].pre if is_embedding(n) and n.endswith("embed_tokens.weight")
            ]
            embed = embed or [n for n in self.layouts[ref].pre if is_embedding(n)]
            if embed:
                info = model.tensors[embed[0]]
        if info is None:
            raise MergeError(f"model {ref!r} has no tensor {name!r} (the other models have it)")
        return info

    def plan_tensor(self, out_name: str, sl: _Slice, names: dict[str, str], position: float) -> OutputTensor:
        method = self.method
        base_ref = sl.base if _separate_base(method, sl) else None
        others = [s for s in sl.sources if s.model != base_ref]
        infos = {s.model: self._info(s.model, names[s.model]) for s in sl.sources}
        # the aliased lm_head of a tied model is read under its embedding name
        src = {ref: TensorSource(ref, infos[ref].name) for ref in infos}
        self._check_shapes(out_name, infos)
        shape = next(iter(infos.values())).shape
        in_dtypes = {i.code for i in infos.values()}

        params: dict[str, Any] = {}
        where = f"for tensor {out_name}"
        for spec in method.params:
            if spec.per_model:
                vals = []
                for s in others:
                    levels = [s.params, sl.params, self.config.parameters]
                    vals.append(resolve(spec, levels, names[s.model], position, f"of model {s.model!r}"))
                params[spec.name] = tuple(vals)
            else:
                levels = [sl.params, self.config.parameters]
                params[spec.name] = resolve(spec, levels, out_name, position, where)
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

    def _check_shapes(self, out_name: str, infos: dict[str, TensorInfo]) -> None:
        shapes = {ref: info.shape for ref, info in infos.items()}
        if len(set(shapes.values())) <= 1:
            return
        detail = ", ".join(f"{ref}: {list(s)}" for ref, s in shapes.items())
        if is_embedding(out_name):
            raise MergeError(
                f"tensor {out_name!r}: vocabulary sizes differ ({detail}); the models use different tokenizers "
                "or padded vocabularies. Align them first (resize the embeddings of the models to one "
                "tokenizer) or merge only models that share a tokenizer"
            )
        raise MergeError(
            f"tensor {out_name!r}: shapes differ between models ({detail}); they are not the same architecture size"
        )


def drop_remote_code(out_config: dict, ref: str) -> str | None:
    """Remove ``auto_map`` (classes that transformers would import from Python files in the folder, i.e.
    remote code) from an output config derived from model ``ref``'s; returns the warning to show, or None.
    The output is loaded with the architecture's built-in transformers classes instead."""
    auto_map = out_config.pop("auto_map", None)
    if auto_map is None:
        return None
    names = ", ".join(sorted(auto_map)) if isinstance(auto_map, dict) else repr(auto_map)
    return (
        f"config.json of {ref!r} has auto_map ({names}), which points transformers at Python files; it is "
        "not copied into the output, which loads with transformers' built-in classes"
    )


def _rewrite_config(
    out_config: dict, slices: list[_Slice], layout: Layout, total_layers: int, tensors, config: MergeConfig
) -> None:
    key = layout.layer_key
    if key:
        n_src = get_nested(out_config, key)
        # per-layer lists (e.g. layer_types) follow the layers they describe
        src_layers = [s.sources[0].start + j for s in slices for j in range(s.length)]
        container = out_config if "." not in key else get_nested(out_config, key.rsplit(".", 1)[0])
        for k, v in list(container.items()):
            if isinstance(v, list) and len(v) == n_src and k not in ("architectures",) and n_src > 1:
                container[k] = [v[i] for i in src_layers]
        set_nested(out_config, key, total_layers)
    floats = {t.out_code for t in tensors if t.out_code in dtypes.FLOAT_CODES}
    if floats:
        name = dtype_name(max(floats, key=dtypes.itemsize) if len(floats) > 1 else next(iter(floats)))
        out_config["dtype"] = name
        if "torch_dtype" in out_config:
            out_config["torch_dtype"] = name
    out_config.pop("_name_or_path", None)
