"""Multi-stage merges: several YAML documents, each a merge, later ones using earlier ones' names as models.

The rules follow mergekit-multi: every document but the final one has a ``name:``; a model reference equal
to a name (or ``name+adapter``) means that stage's output, kept in ``<intermediate-dir>/<name>``. The final
output is the one unnamed document, or, when every document is named, the one stage no other stage uses.
Stages run in dependency order; a cycle, a duplicate name or a reference that is neither a stage nor an
existing folder is a one-line ConfigError before anything runs. Every stage's plan is also built before the
first stage runs (later stages are planned against what earlier ones will write), so a mistake in the last
stage does not surface after hours of merging.

**Skipping unchanged stages.** A stage's identity is a SHA-256 over:

- its document as validated (``MergeConfig``, normalised: key order and YAML formatting do not matter),
- the options that change output bytes (random seed, shard size, tokenizer and card copying) and the
  mergesmith version,
- each input's identity: for another stage, that stage's identity (so a change propagates downstream
  without reading any tensor data); for a model or adapter folder, every top-level file's size, its
  modification time and, for ``.safetensors``, a hash of its header (names, dtypes, shapes, offsets); files
  up to 1 MiB (config.json, tokenizer files) are hashed whole instead, so touching them changes nothing.

Each stage writes ``mergesmith_stage.json`` (its identity and the size and mtime of every file it wrote)
into its folder before the folder is renamed into place. A stage is skipped when that marker holds the same
identity and its files are still as written. Tensor data is never hashed: that would cost a full read of
every input per run, and a file rewritten with the same size, header and mtime is not a realistic accident.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from mergesmith.core.errors import ConfigError, MergeError
from mergesmith.core.model import ModelSource, TensorInfo, model_file, regular_file, resolve_model_dir
from mergesmith.core.write import MARKER as PARTIAL_MARKER
from mergesmith.core.write import check_destination, check_relations, input_paths, output_lock, write_json
from mergesmith.pipeline.config import MergeConfig, load_yaml_documents, parse_config
from mergesmith.pipeline.options import MergeOptions, output_identity
from mergesmith.pipeline.plan import MergePlan, build_plan
from mergesmith.pipeline.run import config_refs, merge_one
from mergesmith.pipeline.vocab import token_refs

MARKER = "mergesmith_stage.json"
MARKER_FORMAT = 1
SMALL_FILE = 1 << 20  # files up to this size are hashed whole
NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")


@dataclass(frozen=True)
class Stage:
    """One document of a multi-stage file."""

    index: int  # 0-based position in the file
    name: str | None
    doc: dict[str, Any]
    config: MergeConfig
    deps: tuple[str, ...]  # names of the stages it uses, in order of first use

    @property
    def label(self) -> str:
        return repr(self.name) if self.name else f"final (unnamed document {self.index + 1})"


@dataclass
class StagePlan:
    stage: Stage
    plan: MergePlan
    final: bool


# --- reading the file -----------------------------------------------------------------------------------


def is_multi_stage(config: Any) -> bool:
    """Whether ``config`` (a path, a YAML string, a list of dicts) holds more than one merge document."""
    if isinstance(config, list | tuple):
        return len(config) > 1
    if isinstance(config, str | Path):
        return len(load_yaml_documents(config)[0]) > 1
    return False


def load_stages(config: str | Path | Sequence[dict]) -> list[Stage]:
    """Parse and check every document: valid merge configs, valid unique names, at most one unnamed."""
    if isinstance(config, list | tuple):
        docs, label = list(config), "config"
    else:
        docs, label = load_yaml_documents(config)
    configs = [parse_config(d, f"{label} document {i + 1}") for i, d in enumerate(docs)]
    names = _check_names(configs, label)
    stages = []
    for i, (doc, cfg) in enumerate(zip(docs, configs)):
        deps = _unique(stage_of(ref, names) for ref in model_refs(cfg))
        stages.append(Stage(i, cfg.name, doc, cfg, tuple(d for d in deps if d is not None)))
    _check_unknown(stages, names, label)
    return stages


def _check_names(configs: Sequence[MergeConfig], label: str) -> set[str]:
    seen: dict[str, int] = {}
    unnamed = []
    for i, cfg in enumerate(configs):
        if cfg.name is None:
            unnamed.append(i + 1)
            continue
        if not NAME_RE.match(cfg.name):
            raise ConfigError(
                f"{label} document {i + 1}: name {cfg.name!r} must be usable as a folder name "
                "(letters, digits, '_', '-', '.'; not starting with '.' or '-')"
            )
        if cfg.name in seen:
            raise ConfigError(f"{label}: documents {seen[cfg.name]} and {i + 1} are both named {cfg.name!r}")
        seen[cfg.name] = i + 1
    if len(unnamed) > 1:
        raise ConfigError(
            f"{label}: documents {', '.join(map(str, unnamed))} have no name; only the final output may be "
            "unnamed (give every intermediate stage a 'name:')"
        )
    return set(seen)


def model_refs(cfg: MergeConfig) -> list[str]:
    """Every model reference of a config: models, slice sources, base models, a tokenizer source."""
    refs = [m.model for m in cfg.models or []]
    for sl in cfg.slices or []:
        refs += [s.model for s in sl.sources] + ([sl.base_model] if sl.base_model else [])
    if cfg.base_model:
        refs.append(cfg.base_model)
    tok = cfg.tokenizer_choice
    if tok not in ("base", "union"):
        refs.append(tok)
    return _unique(refs + token_refs(cfg))


def stage_of(ref: str, names: set[str]) -> str | None:
    """The stage a reference names (``name`` or ``name+adapter``), else None."""
    from mergesmith.core.lora.source import split_lora_ref

    if ref in names:
        return ref
    model, adapter = split_lora_ref(ref)
    return model if adapter is not None and model in names else None


def _check_unknown(stages: Sequence[Stage], names: set[str], label: str) -> None:
    """A bare word that is neither a stage nor a folder is a misspelt stage name, not a Hub model."""
    from mergesmith.core.lora.source import split_lora_ref

    for st in stages:
        for ref in model_refs(st.config):
            if stage_of(ref, names) is not None:
                continue
            model = split_lora_ref(ref)[0]
            if "/" not in model and "\\" not in model and not Path(model).expanduser().exists():
                known = ", ".join(sorted(names)) or "none"
                raise ConfigError(
                    f"{label}: stage {st.label} uses {model!r}, which is neither the name of a stage "
                    f"(names: {known}) nor an existing folder"
                )


def _unique(items: Iterable[Any]) -> list[Any]:
    return list(dict.fromkeys(items))


def stage_order(stages: Sequence[Stage]) -> list[Stage]:
    """Dependency order, keeping file order where there is a choice; a cycle is a ConfigError."""
    by_name = {s.name: s for s in stages if s.name}
    done: set[int] = set()
    order: list[Stage] = []
    visiting: list[Stage] = []

    def visit(st: Stage) -> None:
        if st.index in done:
            return
        if st in visiting:
            cycle = visiting[visiting.index(st) :] + [st]
            raise ConfigError("stages form a cycle: " + " -> ".join(s.name or "?" for s in cycle))
        visiting.append(st)
        for dep in st.deps:
            visit(by_name[dep])
        visiting.pop()
        done.add(st.index)
        order.append(st)

    for st in stages:
        visit(st)
    return order


def final_stage(stages: Sequence[Stage]) -> Stage:
    """The unnamed document, or the one stage no other stage uses (mergekit-multi writes the unnamed one
    to --out-path; with every document named it writes nothing there, but OUT_DIR needs one)."""
    unnamed = [s for s in stages if s.name is None]
    if unnamed:
        return unnamed[0]
    used = {d for s in stages for d in s.deps}
    sinks = [s for s in stages if s.name not in used]
    if len(sinks) != 1:
        listed = ", ".join(repr(s.name) for s in sinks)
        raise ConfigError(
            f"stages {listed} are not used by any other stage, so the final output is ambiguous; remove the "
            "'name:' of the one to write to OUT_DIR"
        )
    return sinks[0]


def rewrite_refs(doc: dict[str, Any], fn: Callable[[str], str]) -> dict[str, Any]:
    """A copy of a raw document with every model reference passed through ``fn``."""
    out = copy.deepcopy(doc)
    for m in out.get("models") or []:
        m["model"] = fn(m["model"])
    for sl in out.get("slices") or []:
        for s in sl.get("sources") or []:
            s["model"] = fn(s["model"])
        if sl.get("base_model"):
            sl["base_model"] = fn(sl["base_model"])
    if out.get("base_model"):
        out["base_model"] = fn(out["base_model"])
    tok_src = out.get("tokenizer_source")
    if tok_src and tok_src not in ("base", "union"):
        out["tokenizer_source"] = fn(tok_src)
    tok = out.get("tokenizer")
    if isinstance(tok, dict) and tok.get("source") not in (None, "base", "union"):
        tok["source"] = fn(tok["source"])
    for emb in (tok.get("tokens") or {}).values() if isinstance(tok, dict) else ():
        src = emb.get("source") if isinstance(emb, dict) else None
        if isinstance(src, str):
            emb["source"] = fn(src)
        elif isinstance(src, dict) and isinstance(src.get("model"), str):
            src["model"] = fn(src["model"])
    return out


# --- planning --------------------------------------------------------------------------------------------


class PlannedModelSource(ModelSource):
    """What a stage will write, as seen by the planner: its config.json and tensor index, from its plan.

    Lets every stage be planned (and checked) before any has run. Reading data from it is an error.
    """

    def __init__(self, ref: str, path: Path, plan: MergePlan):
        super().__init__(ref, path)
        self.plan = plan
        # fill ModelSource's cached properties directly: there is no file to read them from yet
        self.__dict__["config"] = copy.deepcopy(plan.out_config)
        target = path / "model.safetensors"
        self.__dict__["tensors"] = {
            t.name: TensorInfo(t.name, t.out_code, t.shape, target, 0) for t in plan.tensors
        }

    def read(self, name: str, rows: tuple[int, int] | None = None):
        raise MergeError(f"stage {self.ref!r} has not been merged yet")

    def tokenizer_text(self) -> str | None:
        """The tokenizer.json the stage will write: its union, or its tokenizer source's."""
        vocab = self.plan.vocab
        if vocab is not None and vocab.union is not None:
            return json.dumps(vocab.union.data)
        return self.plan.models[self.plan.tokenizer_model].tokenizer_text()

    def tokenizer_files(self) -> list[Path]:
        return []


def plan_stages(
    config: str | Path | Sequence[dict],
    intermediate_dir: str | Path | None = None,
    *,
    allow_crimes: bool = False,
    strict: bool = False,
    mergekit_compat: bool = False,
    per_expert: bool = False,
) -> list[StagePlan]:
    """Plan every stage in order, later ones against the planned outputs of earlier ones; nothing is read
    but headers and nothing is written. Close each plan (``plan.close()``) when done. ``allow_crimes``,
    ``strict``, ``mergekit_compat`` and ``per_expert`` apply to every stage (see
    :func:`mergesmith.pipeline.plan.build_plan`)."""
    stages = load_stages(config)
    inter = Path(intermediate_dir or "<intermediate-dir>")
    return _plan_all(
        stage_order(stages), final_stage(stages), inter, allow_crimes, strict, mergekit_compat, per_expert
    )


def _plan_all(
    order: Sequence[Stage],
    final: Stage,
    inter: Path,
    allow_crimes: bool = False,
    strict: bool = False,
    mergekit_compat: bool = False,
    per_expert: bool = False,
) -> list[StagePlan]:
    from mergesmith.core.lora.source import LoraModelSource

    names = {s.name for s in order if s.name}
    planned: dict[str, PlannedModelSource] = {}
    out: list[StagePlan] = []
    try:
        for st in order:
            models: dict[str, ModelSource] = {}
            for ref in model_refs(st.config):
                dep = stage_of(ref, names)
                if dep is None:
                    continue
                upstream = planned[dep]
                models[ref] = upstream if ref == dep else LoraModelSource.open(ref, base=upstream)
            try:
                plan = build_plan(
                    st.config,
                    models,
                    allow_crimes=allow_crimes,
                    strict=strict,
                    mergekit_compat=mergekit_compat,
                    per_expert=per_expert,
                )
            except MergeError as exc:
                raise type(exc)(f"stage {st.label}: {exc}") from None
            out.append(StagePlan(st, plan, st is final))
            if st.name:
                planned[st.name] = PlannedModelSource(st.name, inter / st.name, plan)
    except BaseException:
        for sp in out:
            sp.plan.close()
        raise
    return out


# --- identities and markers ------------------------------------------------------------------------------


def _sha(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _file_identity(path: Path) -> list[Any]:
    st = path.stat()
    if st.st_size <= SMALL_FILE:
        return [st.st_size, hashlib.sha256(path.read_bytes()).hexdigest()]
    ident: list[Any] = [st.st_size, st.st_mtime_ns]
    if path.suffix == ".safetensors":
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            ident.append(hashlib.sha256(f.read(min(n, st.st_size))).hexdigest())
    return ident


def folder_identity(path: Path) -> str:
    """Cheap content identity of a model or adapter folder (see the module docstring)."""
    names = sorted(p.name for p in path.iterdir() if not p.name.startswith("."))
    # each file is checked to lie inside the folder before it is read (a symlink out is refused)
    files = [f for f in (model_file(path, n, str(path)) for n in names) if regular_file(f)]
    return _sha({p.name: _file_identity(p) for p in files})


def _ref_identity(ref: str, stage_ids: dict[str, str], names: set[str]) -> dict[str, str]:
    from mergesmith.core.lora.source import resolve_adapter_dir, split_lora_ref

    model, adapter = split_lora_ref(ref)
    ident = (
        {"stage": stage_ids[model]}
        if model in names
        else {"model": folder_identity(resolve_model_dir(model))}
    )
    if adapter is not None:
        ident["adapter"] = folder_identity(resolve_adapter_dir(adapter))
    return ident


def stage_identity(
    st: Stage, stage_ids: dict[str, str], names: set[str], options: dict[str, Any]
) -> dict[str, Any]:
    """The parts of a stage's identity (config, options, each input), and their hash under ``"hash"``."""
    from mergesmith.core.defaults import VERSION as __version__

    parts = {
        "config": _sha(st.config.model_dump(mode="json", exclude_none=True)),
        "options": _sha({**options, "mergesmith": __version__}),
        "inputs": {ref: _sha(_ref_identity(ref, stage_ids, names)) for ref in model_refs(st.config)},
    }
    return {**parts, "hash": _sha(parts)}


def _written_files(folder: Path) -> dict[str, list[int]]:
    return {
        p.name: [p.stat().st_size, p.stat().st_mtime_ns]
        for p in sorted(folder.iterdir())
        if p.is_file() and p.name not in (MARKER, PARTIAL_MARKER)
    }


def read_marker(folder: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("format") == MARKER_FORMAT else None


def stale_reason(folder: Path, identity: dict[str, Any]) -> str | None:
    """None if ``folder`` holds this exact stage, else why it must be (re)made."""
    if not folder.exists():
        return "not merged yet"
    marker = read_marker(folder)
    if marker is None:
        return "no stage marker"
    if marker.get("hash") == identity["hash"]:
        try:
            return None if _written_files(folder) == marker.get("files") else "its files changed"
        except OSError:
            return "its files changed"
    if marker.get("config") != identity["config"]:
        return "config changed"
    if marker.get("options") != identity["options"]:
        return "options or mergesmith version changed"
    old = marker.get("inputs") or {}
    changed = [ref for ref, h in identity["inputs"].items() if old.get(ref) != h]
    return f"input {changed[0]!r} changed" if changed else "inputs changed"


# --- running ---------------------------------------------------------------------------------------------


def default_intermediate_dir(out_dir: Path) -> Path:
    """``OUT_DIR.stages`` beside OUT_DIR: on the same file system, so stage folders are renamed into place."""
    return out_dir.parent / f"{out_dir.name}.stages"


def run_stages(config: str | Path | Sequence[dict], out_dir: str | Path, options: MergeOptions) -> Path:
    """Run a multi-stage file: every stage that is not up to date, in dependency order; returns OUT_DIR.

    Intermediate stages go to ``options.intermediate_dir/<name>`` (default ``OUT_DIR.stages``), the final
    one to ``out_dir``. ``overwrite`` (and ``force``, see :func:`mergesmith.core.write.check_destination`)
    is needed to replace an ``out_dir`` that holds something else; stage folders that a previous run wrote
    (they carry a marker) are replaced when stale. ``out_dir`` is locked for the whole run.
    """
    out = Path(out_dir).expanduser().absolute()
    stages = load_stages(config)
    names = {s.name for s in stages if s.name}
    refs = [r for s in stages for r in config_refs(s.config) if stage_of(r, names) is None]
    inputs = input_paths(refs)
    check_relations(out, inputs)  # before the lock file is created, which could be inside an input
    with output_lock(out):
        return _run_stages(stages, inputs, out, options)


def _run_stages(stages: list[Stage], inputs: list[Path], out: Path, options: MergeOptions) -> Path:
    order, final = stage_order(stages), final_stage(stages)
    inter = (
        Path(options.intermediate_dir).expanduser().absolute()
        if options.intermediate_dir
        else default_intermediate_dir(out)
    )
    _check_folders(out, inter)
    dests = {st.index: out if st is final else inter / str(st.name) for st in order}
    checked = _plan_all(
        order, final, inter, options.allow_crimes, options.strict, options.mergekit_compat, options.per_expert
    )
    for sp in checked:
        sp.plan.close()  # every stage checked before the first one runs
    identity_options = output_identity(options)
    names = {s.name for s in stages if s.name}
    ids: dict[str, str] = {}
    todo: list[tuple[Stage, dict[str, Any], str]] = []
    for st in order:
        identity = stage_identity(st, ids, names, identity_options)
        if st.name:
            ids[st.name] = identity["hash"]
        reason = stale_reason(dests[st.index], identity)
        if reason is None:
            _say(options.quiet, f"stage {st.label}: up to date, skipped ({dests[st.index]})")
            continue
        if st is final:
            check_destination(out, overwrite=options.overwrite, force=options.force, inputs=[*inputs, inter])
        else:
            _check_stage_folder(dests[st.index])
        todo.append((st, identity, reason))
    for n, (st, identity, reason) in enumerate(todo, 1):
        dest = dests[st.index]
        _say(options.quiet, f"stage {n}/{len(todo)} {st.label} ({reason}) -> {dest}")
        doc = rewrite_refs(st.doc, lambda ref: _to_path(ref, names, inter))
        # a stage replaces its own folder; only the final one may also need --force
        stage_options = replace(
            options, overwrite=True, force=options.force and st is final, intermediate_dir=None
        )
        _run_stage(doc, dest, identity, stage_options)
    if not todo:
        _say(options.quiet, f"all {len(order)} stages up to date; {out} unchanged")
    return out


def _check_folders(out: Path, inter: Path) -> None:
    if inter == out or out in inter.parents or inter in out.parents:
        raise MergeError(
            f"the intermediate folder {inter} and the output folder {out} must not contain each other; "
            "choose another --intermediate-dir"
        )
    if inter.exists() and not inter.is_dir():
        raise MergeError(f"intermediate folder {inter} exists and is not a folder")


def _check_stage_folder(dest: Path) -> None:
    """Only replace an intermediate folder that a stage wrote (it has a marker)."""
    if dest.exists() and read_marker(dest) is None:
        raise MergeError(
            f"stage folder {dest} exists but was not written by a mergesmith stage; remove it or choose another "
            "--intermediate-dir"
        )


def _to_path(ref: str, names: set[str], inter: Path) -> str:
    from mergesmith.core.lora.source import split_lora_ref

    dep = stage_of(ref, names)
    if dep is None:
        return ref
    adapter = split_lora_ref(ref)[1]
    return str(inter / dep) + (f"+{adapter}" if adapter and ref != dep else "")


def _run_stage(doc: dict[str, Any], dest: Path, identity: dict[str, Any], options: MergeOptions) -> None:
    """Merge with the marker added inside the temporary folder before it is renamed into place, so a folder
    with a marker is always complete."""

    def add_marker(folder: Path) -> None:
        marker = {"format": MARKER_FORMAT, **identity, "files": _written_files(folder)}
        write_json(folder / MARKER, marker)

    merge_one(doc, dest, options, before_commit=add_marker)


def _say(quiet: bool, message: str) -> None:
    if not quiet:
        print(f"mergesmith: {message}", file=sys.stderr)
