"""The YAML merge configuration (mergekit's format), as strict pydantic models.

Unknown keys, wrong types and inconsistent combinations are errors that name the key; mergekit silently
ignores unknown keys, which turns a typo into a wrong merge.
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

from mergesmith.core.errors import ConfigError

Scalar = bool | int | float | str


def _not_bool(value: Any) -> Any:
    if isinstance(value, bool):  # pydantic reads true as 1 for an int field
        raise ValueError("expected a whole number, not true/false")
    return value


#: A count in a config of ours (``max_new_tokens``, ``limit``): a whole number; ``true`` is an error, not 1.
Count = Annotated[int, BeforeValidator(_not_bool)]
#: A model reference (a folder, org/name, MODEL+ADAPTER): never empty, which would name the current folder
ModelRef = Annotated[str, Field(min_length=1)]
Gradient = list[int | float]


class FilterEntry(BaseModel):
    """One entry of a conditional parameter: the first entry whose ``filter`` is in the tensor name wins."""

    model_config = ConfigDict(extra="forbid")
    filter: str | None = None
    value: Scalar | Gradient


ParamValue = Scalar | Gradient | list[FilterEntry]
Parameters = dict[str, ParamValue]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class InputModel(_Strict):
    model: ModelRef
    parameters: Parameters | None = None


class SliceSource(_Strict):
    model: ModelRef
    layer_range: tuple[int, int] | None = None
    parameters: Parameters | None = None

    @field_validator("layer_range")
    @classmethod
    def _range_order(cls, v):
        if v is not None and not (0 <= v[0] < v[1]):
            raise ValueError(f"layer_range {list(v)} must be [start, end) with 0 <= start < end")
        return v


class Slice(_Strict):
    sources: list[SliceSource] = Field(min_length=1)
    base_model: ModelRef | None = None
    parameters: Parameters | None = None


class ModuleDef(_Strict):
    """One entry of mergekit's ``modules:`` (``modules: {default: {slices: ...}}``): the slices or models of
    one module, with parameters between the slices' and the top-level ones in precedence."""

    models: list[InputModel] | None = None
    slices: list[Slice] | None = None
    parameters: Parameters | None = None

    @model_validator(mode="after")
    def _one_of_models_slices(self):
        _check_models_or_slices(self.models, self.slices)
        return self


def _check_models_or_slices(models: list | None, slices: list | None) -> None:
    """Exactly one of ``models`` and ``slices``, and ``models`` not empty (a config or a module)."""
    if (models is None) == (slices is None):
        raise ValueError("give exactly one of 'models' or 'slices'")
    if models is not None and not models:
        raise ValueError("'models' is empty")


class ModelTokenSource(_Strict):
    """A token's row taken from a model's row of a token (``token`` or ``token_id``), mergekit's."""

    kind: Literal["model_token"]
    model: ModelRef
    token: str | None = None
    token_id: int | None = None

    @model_validator(mode="after")
    def _one_token(self):
        if (self.token is None) == (self.token_id is None):
            raise ValueError("give exactly one of 'token' or 'token_id'")
        return self


class ZeroSource(_Strict):
    kind: Literal["zero"]


class MeanSource(_Strict):
    """mergesmith's: each model's row is the mean of its own token rows."""

    kind: Literal["mean"]


TokenSource = Annotated[ModelTokenSource | ZeroSource | MeanSource, Field(discriminator="kind")]


_TOKEN_KINDS: dict[str, type[BaseModel]] = {
    "model_token": ModelTokenSource,
    "zero": ZeroSource,
    "mean": MeanSource,
}


class TokenEmbedding(_Strict):
    source: str | TokenSource | None = None  # a model reference, or one of the kinds
    force: bool = False

    @field_validator("source", mode="before")
    @classmethod
    def _one_source(cls, v: Any) -> Any:
        """A model reference, or a mapping with a known ``kind`` checked as that kind (pydantic's own
        message for a union names every member it tried)."""
        if v is None or isinstance(v, str):
            return v
        kinds = " | ".join(_TOKEN_KINDS)
        if not isinstance(v, dict) or v.get("kind") not in _TOKEN_KINDS:
            got = f"kind {v.get('kind')!r}" if isinstance(v, dict) else type(v).__name__
            raise ValueError(f"a token's source is a model reference or {{kind: {kinds}}}, got {got}")
        try:
            return _TOKEN_KINDS[v["kind"]].model_validate(v)
        except ValidationError as e:
            err = e.errors()[0]
            where = ".".join(str(p) for p in err["loc"])
            msg = str(err["msg"]).removeprefix("Value error, ")
            raise ValueError(f"kind {v['kind']}: {where + ': ' if where else ''}{msg}") from None


class TokenizerConfig(_Strict):
    source: str = "union"  # base | union | a model reference (mergekit's default is union)
    tokens: dict[str, TokenEmbedding] | None = None
    pad_to_multiple_of: int | None = Field(default=None, ge=1)
    # mergesmith's: how a row a model lacks is made (docs/config.md), and OMP's number of shared tokens
    default_init: Literal["omp", "mergekit", "mean", "zero", "subword"] = "omp"
    omp_k: int = Field(default=64, ge=1)


class MergeConfig(_Strict):
    merge_method: str
    models: list[InputModel] | None = None
    slices: list[Slice] | None = None
    base_model: ModelRef | None = None
    parameters: Parameters | None = None
    dtype: str | None = None
    out_dtype: str | None = None
    tokenizer_source: str | None = None
    tokenizer: TokenizerConfig | None = None
    chat_template: str | None = None
    name: str | None = None
    # warnings found while reading the file (keys mergekit ignores); build_plan reports them
    _read_warnings: list[str] = PrivateAttr(default_factory=list)

    @model_validator(mode="after")
    def _one_of_models_slices(self):
        _check_models_or_slices(self.models, self.slices)
        if self.tokenizer_source is not None and self.tokenizer is not None:
            raise ValueError("give 'tokenizer_source' or 'tokenizer', not both")
        return self

    @property
    def tokenizer_choice(self) -> str:
        """``base`` or a model reference whose tokenizer files are copied."""
        if self.tokenizer is not None:
            return self.tokenizer.source
        return self.tokenizer_source or "base"


DtypeName = Literal["float32", "float16", "bfloat16", "float64"]


def _format_validation_error(
    exc: ValidationError, source: str, docs: str = "docs/config.md", prefix: tuple[str, ...] = ()
) -> str:
    err = exc.errors()[0]
    err["loc"] = (*prefix, *err["loc"])
    # pydantic's names for the member of a union it tried (constrained-float, literal[...]) are not keys
    internal = ("function-", "tagged-", "constrained-", "literal[")
    loc = ".".join(str(p) for p in err["loc"] if not str(p).startswith(internal))
    loc = loc.replace(".list[FilterEntry]", "").replace(".list[union[int,float]]", "")
    msg = err["msg"]
    parts = [str(p) for p in err["loc"]]
    if "parameters" in parts and len(parts) > parts.index("parameters") + 1:
        # a parameter value matches none of the forms; pydantic names the last form it tried
        name = parts[parts.index("parameters") + 1]
        loc = ".".join(parts[: parts.index("parameters") + 2])
        msg = (
            f"parameter {name!r} must be a number, true/false, a list of numbers (a gradient) or a list of "
            "{filter, value} entries"
        )
    elif err["type"] == "extra_forbidden":
        msg = f"unknown key (check its spelling against {docs})"
    elif err["type"] == "missing":
        msg = "required key is missing"
    where = f" at '{loc}'" if loc else ""
    return f"{source}: invalid config{where}: {msg}"


# mergekit keys that mergesmith does not take, with what to do instead of a spelling suggestion
UNSUPPORTED_KEYS = {
    "residual_weight": "'residual_weight' has no effect (mergekit parses it but never uses it); remove it",
    "random_seed": "the seed is not a config key (mergekit ignores it here); pass --random-seed N "
    "(random_seed=N in mergesmith.merge)",
}


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """``; did you mean 'x'?`` for the nearest of ``choices``, or an empty string."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def _unknown_key(
    key: Any,
    known: list[str],
    where: str,
    source: str,
    what: str = "config",
    unsupported: Mapping[str, str] = UNSUPPORTED_KEYS,
) -> ConfigError:
    path = f"{where}.{key}" if where else str(key)
    if key in unsupported:
        return ConfigError(f"{source}: invalid {what} at '{path}': {unsupported[key]}")
    hint = did_you_mean(str(key), known) or f" (known keys here: {', '.join(known)})"
    return ConfigError(f"{source}: invalid {what} at '{path}': unknown key{hint}")


def check_keys(
    data: Any,
    cls: type[BaseModel],
    source: str,
    children: Mapping[tuple[str, str], type[BaseModel]] | None = None,
    what: str = "config",
    unsupported: Mapping[str, str] = UNSUPPORTED_KEYS,
    where: str = "",
) -> None:
    """Unknown keys anywhere in a config, with the nearest known key, before pydantic validates: its
    first error would otherwise be a consequence of the typo ('merge_methd' -> "required key missing").
    ``children`` maps (model class name, key) to the model of that key's mapping (or of each item of
    its list); by default, the merge config's. ``what`` names the config in messages; ``unsupported``
    gives a key's own message instead of a spelling suggestion."""
    if not isinstance(data, dict):
        return
    children = _CHILDREN if children is None else children
    known = list(cls.model_fields)
    for key, value in data.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in cls.model_fields:
            raise _unknown_key(key, known, where, source, what, unsupported)
        if key == "parameters" and isinstance(value, dict):
            _check_parameter_values(value, path, source)
        child = children.get((cls.__name__, key))
        if child is None:
            continue
        items = enumerate(value) if isinstance(value, list) else [(None, value)]
        for i, item in items:
            check_keys(item, child, source, children, what, unsupported, path if i is None else f"{path}.{i}")


def _check_parameter_values(params: dict, where: str, source: str) -> None:
    """Filter entries (``{filter, value}``) inside parameter values."""
    known = list(FilterEntry.model_fields)
    for name, value in params.items():
        if isinstance(value, list):
            for i, entry in enumerate(value):
                if isinstance(entry, dict):
                    for key in entry:
                        if key not in FilterEntry.model_fields:
                            raise _unknown_key(key, known, f"{where}.{name}.{i}", source)


_CHILDREN: dict[tuple[str, str], type[BaseModel]] = {
    ("MergeConfig", "models"): InputModel,
    ("MergeConfig", "slices"): Slice,
    ("MergeConfig", "tokenizer"): TokenizerConfig,
    ("Slice", "sources"): SliceSource,
    ("ModuleDef", "models"): InputModel,
    ("ModuleDef", "slices"): Slice,
}


def parse_config(data: Any, source: str = "config") -> MergeConfig:
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: a merge config must be a YAML mapping, got {type(data).__name__}")
    if "modules" in data:
        data = _modules_to_slices(data, source)
    data, ignored = _top_level_parameters(data)
    check_keys(data, MergeConfig, source)
    try:
        config = MergeConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(exc, source)) from None
    config._read_warnings.extend(ignored)
    return config


def _top_level_parameters(data: dict) -> tuple[dict, list[str]]:
    """Merge parameters written at the top level of the file instead of under ``parameters:`` (e.g. an
    unindented ``int8_mask: true``): mergekit ignores them, and models were published from that behaviour,
    so they are dropped with a warning each (an error under --strict). Other unknown keys stay errors."""
    from mergesmith.methods import all_parameter_names

    known = all_parameter_names()
    stray = [k for k in data if k not in MergeConfig.model_fields and k in known]
    if not stray:
        return data, []
    warnings = [
        f"top-level key {k!r} is ignored, as mergekit ignores it: merge parameters go under `parameters:` "
        f"(e.g. `parameters: {{{k}: {json.dumps(data[k])}}}`)"
        for k in stray
    ]
    return {k: v for k, v in data.items() if k not in stray}, warnings


def _modules_to_slices(data: dict, source: str) -> dict:
    """mergekit's ``modules: {default: {models | slices, parameters}}`` as the same config written with
    ``models``/``slices``. ``default`` is the one module mergekit gives a model with one stack of layers;
    other names select parts of multimodal or encoder-decoder models, which are not planned separately
    here. The module's parameters rank between a slice's and the top-level ones, which is what merging
    them into the top-level ones (``_stack_parameters``) gives when there is one module."""
    modules = data["modules"]
    where = f"{source}: invalid config at 'modules'"
    if not isinstance(modules, dict) or not modules:
        raise ConfigError(f"{where}: must map module names to {{models or slices, parameters}}")
    names = [str(n) for n in modules]
    if names != ["default"]:
        raise ConfigError(
            f"{where}: module(s) {', '.join(repr(n) for n in names if n != 'default')} select parts of "
            "a multimodal or encoder-decoder model, which mergesmith does not merge separately; write "
            "'models:' or 'slices:' (every part merged alike; per-part values as parameter filters on the "
            "tensor names)"
        )
    if "models" in data or "slices" in data:
        raise ConfigError(f"{where}: give exactly one of 'models', 'slices' or 'modules'")
    module = modules["default"]
    if not isinstance(module, dict):
        raise ConfigError(f"{where}.default: must be a mapping with 'models' or 'slices'")
    check_keys(module, ModuleDef, source, where="modules.default")
    try:
        ModuleDef.model_validate(module)
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(exc, source, prefix=("modules", "default"))) from None
    out = {k: v for k, v in data.items() if k != "modules"}
    out.update({k: v for k, v in module.items() if k in ("models", "slices")})
    if module.get("parameters"):
        out["parameters"] = _stack_parameters(module["parameters"], data.get("parameters") or {})
    return out


def _stack_parameters(high: dict, low: Any) -> dict:
    """One parameter level that answers as ``high`` asked first, then ``low``: a filter list of ``high``
    that matches nothing falls through to ``low``'s value, so the two are concatenated (a plain value of
    ``low`` becomes a catch-all entry)."""
    if not isinstance(low, dict):
        return high  # not a mapping: the top-level validation reports it
    out = dict(low)
    for name, value in high.items():
        below = low.get(name)
        if below is None or not _is_filter_list(value):
            out[name] = value
        else:
            out[name] = [*value, *(below if _is_filter_list(below) else [{"value": below}])]
    return out


def _is_filter_list(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, dict) for v in value)


#: A merge config is a few hundred values a few levels deep. Past these bounds a document is hostile or
#: broken (YAML aliases can make a 1 KB file expand to billions of values, which validation would visit
#: one by one), and it is refused before anything walks it recursively.
MAX_DEPTH = 64
MAX_VALUES = 200_000


def _check_document_size(doc: Any, label: str) -> None:
    """Refuse a document nested deeper than MAX_DEPTH or holding more than MAX_VALUES values (aliases
    counted as often as they are used), without recursion and without visiting more than MAX_VALUES."""
    stack: list[tuple[Any, int]] = [(doc, 1)]
    seen = 0
    while stack:
        value, depth = stack.pop()
        seen += 1
        if seen > MAX_VALUES:
            raise ConfigError(f"{label}: the config expands to more than {MAX_VALUES} values (YAML aliases?)")
        if depth > MAX_DEPTH:
            raise ConfigError(f"{label}: the config is nested more than {MAX_DEPTH} levels deep")
        if isinstance(value, dict):
            stack.extend((v, depth + 1) for v in value.values())
            stack.extend((k, depth + 1) for k in value if isinstance(k, tuple))
        elif isinstance(value, list | tuple):
            stack.extend((v, depth + 1) for v in value)


class _StrictLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key given twice in one mapping (PyYAML keeps the last one
    silently, so `merge_method: linear` then `merge_method: ties` merged with ties). Keys brought in by a
    `<<:` merge may still be overridden, as YAML says."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        if isinstance(node, yaml.MappingNode):
            seen: set = set()
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    duplicate = key in seen
                except TypeError:  # an unhashable key: the base class reports it
                    continue
                if duplicate:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"key {key!r} is given twice in one mapping", key_node.start_mark
                    )
                seen.add(key)
        return super().construct_mapping(node, deep=deep)


def load_yaml_documents(path_or_text: str | Path) -> tuple[list[Any], str]:
    """Read one or more YAML documents from a file path or a YAML string; returns (documents, label)."""
    text: str
    label: str
    p = Path(path_or_text) if isinstance(path_or_text, Path) or "\n" not in str(path_or_text) else None
    if p is not None and p.exists():
        if p.is_dir():
            raise ConfigError(f"{p}: is a folder, expected a YAML config file")
        try:
            text = p.read_bytes().decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ConfigError(
                f"{p}: the config is not UTF-8 text (byte {exc.start}); save it as UTF-8"
            ) from None
        except OSError as exc:
            raise ConfigError(f"{p}: cannot read config ({exc.strerror or exc.__class__.__name__})") from None
        label = str(p)
    elif (
        p is not None
        and isinstance(path_or_text, Path | str)
        and str(path_or_text).endswith((".yml", ".yaml"))
    ):
        raise ConfigError(f"{path_or_text}: config file not found")
    else:
        text, label = str(path_or_text), "config"
    try:
        docs = [d for d in yaml.load_all(text, Loader=_StrictLoader) if d is not None]
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{label}: not valid YAML{where}: {problem}") from None
    except RecursionError:
        raise ConfigError(f"{label}: the config is nested too deeply to parse") from None
    for doc in docs:
        _check_document_size(doc, label)
    if not docs:
        raise ConfigError(f"{label}: the config is empty")
    return docs, label


def load_config(config: str | Path | dict | MergeConfig) -> MergeConfig:
    """A MergeConfig from a path, a YAML string, a dict, or a MergeConfig."""
    if isinstance(config, MergeConfig):
        return config
    if isinstance(config, dict):
        return parse_config(config)
    docs, label = load_yaml_documents(config)
    if len(docs) > 1:
        raise ConfigError(
            f"{label}: has {len(docs)} YAML documents, a multi-stage merge; run it with `mergesmith merge` "
            "(mergesmith.merge) or plan it with `mergesmith plan` (mergesmith.pipeline.stages.plan_stages)"
        )
    return parse_config(docs[0], label)


def config_json_schema() -> dict:
    """The config's JSON schema, with ``merge_method`` listing the registered methods (the model keeps it
    a plain string, so that an unknown method gets the registry's own one-line error)."""
    from mergesmith.methods import methods

    schema = MergeConfig.model_json_schema()
    schema["properties"]["merge_method"]["enum"] = sorted(methods())
    return schema


def config_text(config: str | Path | dict | BaseModel) -> str:
    """The config (merge or MoE) as YAML text, for the model card and the saved copy of the config."""
    if isinstance(config, BaseModel):
        return yaml.safe_dump(config.model_dump(exclude_none=True), sort_keys=False)
    if isinstance(config, dict):
        return yaml.safe_dump(config, sort_keys=False)
    p = Path(config)
    if "\n" not in str(config) and p.is_file():
        return p.read_text()
    load_yaml_documents(config)  # raise the proper error for a missing file
    return str(config)
