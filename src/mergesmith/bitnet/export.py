"""BitNet export: ternarise a model and write it for transformers or llama.cpp (``convert_model``, the
Python API of ``mergesmith bitnet``; the command parses its flags into :class:`BitnetOptions`).

The model is read tensor by tensor (:func:`mergesmith.core.sources.open_source`: a folder or hub id, a packed
BitNet checkpoint seen as float weights, or ``model+adapter`` with a LoRA adapter applied as it is read), and each converted tensor is written as soon as it exists: safetensors shards
laid out up front (:class:`mergesmith.core.write.ShardedWriter`), or a GGUF file whose header is written
from the plan before the first tensor. Everything goes to a temporary folder that becomes OUT_DIR
only when complete (:class:`mergesmith.core.write.OutputFolder`).
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from mergesmith.core.bitnet.constants import DEFAULT_LINEAR_CLASS
from mergesmith.core.defaults import DEFAULT_SHARD_SIZE
from mergesmith.core.errors import MergeError

if TYPE_CHECKING:
    from mergesmith.bitnet.convert import LayerStat, TensorSource
    from mergesmith.core.bitnet.quant import TensorSelector
    from mergesmith.core.model import ModelSource


@dataclass(frozen=True)
class BitnetOptions:
    """What to export and how (the flags of ``mergesmith bitnet``, see its --help)."""

    model: str
    out_dir: str
    format: str = "hf"  # "hf" (transformers) or "gguf"
    linear_class: str = DEFAULT_LINEAR_CLASS
    gguf_type: str = "tq2_0"
    include: list[str] | None = None
    exclude: list[str] | None = None
    out_shard_size: str | int = DEFAULT_SHARD_SIZE
    heal: int = 0
    heal_data: str | None = None
    heal_lr: float = 1e-3
    heal_seq: int = 64
    overwrite: bool = False
    force: bool = False
    quiet: bool = False


def convert_model(
    model: str | Path,
    out_dir: str | Path,
    *,
    out: TextIO | None = None,
    err: TextIO | None = None,
    **options: Any,
) -> Path:
    """Ternarise ``model`` (BitNet b1.58) into ``out_dir``: a transformers checkpoint (``format="hf"``)
    or a GGUF file (``format="gguf"``; ``out_dir`` ending in ``.gguf`` names the file). ``options`` are
    :class:`BitnetOptions`' fields (``include``, ``exclude``, ``heal``, ``overwrite``, ...). Returns the
    path written."""
    return export(BitnetOptions(str(model), str(out_dir), **options), out, err)


def _selector(args: BitnetOptions) -> TensorSelector:
    from mergesmith.core.bitnet.quant import TensorSelector

    try:
        return TensorSelector.from_patterns(args.include, args.exclude)
    except ValueError as exc:
        raise MergeError(str(exc)) from exc


def warn_if_float(source: TensorSource, selector: TensorSelector, model: str, err: TextIO) -> None:
    """One line on ``err`` when the first selected weight is not already ternary and the config does
    not say the model was trained ternary (a packed BitNet input is ternary by construction)."""
    from mergesmith.core.bitnet.hf import trained_ternary
    from mergesmith.core.bitnet.quant import as_ternary
    from mergesmith.core.bitnet.source import BitnetModelSource

    if isinstance(source, BitnetModelSource) or trained_ternary(source.config):
        return
    for name, entry in source.tensors.items():
        if selector.selects(name, entry.shape):
            if as_ternary(source.read(name)) is None:
                print(
                    f"mergesmith: warning: {model} holds float weights: ternarising a model after "
                    "training destroys its quality (BitNet models are trained ternary); heal it with "
                    "quantisation-aware training before use",
                    file=err,
                )
            return


def _heal_ids(args: BitnetOptions, model_path: Path, err: TextIO) -> Any:
    """Token ids of ``--heal-data`` (tokenised with the model's tokenizer), or None."""
    import torch

    from mergesmith.core.hf_load import load_tokenizer, quiet_transformers

    if not args.heal_data:
        print("mergesmith: note: --heal without --heal-data distils on random token ids", file=err)
        return None
    try:
        text = Path(args.heal_data).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise MergeError(f"--heal-data: cannot read it as UTF-8 text ({exc})") from None
    tokenizer = load_tokenizer(model_path, args.model, "; --heal-data is tokenised with it")
    with quiet_transformers():  # the whole text is one long sequence on purpose: it is cut into windows
        ids = torch.tensor(tokenizer(text)["input_ids"], dtype=torch.long)
    if ids.numel() < 2:
        raise MergeError(f"--heal-data {args.heal_data} has no tokens")
    return ids


def _heal_source(
    source: ModelSource, args: BitnetOptions, selector: TensorSelector, out: TextIO, err: TextIO
) -> TensorSource:
    """Load MODEL in float32, heal a copy, return it as an in-memory source with the input's dtypes."""
    import torch

    from mergesmith.bitnet import heal
    from mergesmith.bitnet.convert import DictSource
    from mergesmith.core.bitnet.source import BitnetModelSource
    from mergesmith.core.hf_load import load_causal_lm
    from mergesmith.core.threads import threads_for

    if isinstance(source, BitnetModelSource):
        raise MergeError("--heal needs float weights; MODEL is a packed BitNet checkpoint")
    teacher = load_causal_lm(source, torch.float32, "for --heal").eval()
    context = getattr(teacher.config, "max_position_embeddings", None)
    if context and args.heal_seq > context:
        raise MergeError(f"--heal-seq {args.heal_seq} is longer than MODEL's context ({context} positions)")
    ids = _heal_ids(args, source.path, err)
    vocab = int(teacher.config.vocab_size)
    train = heal.token_batches(ids, vocab, seq_len=args.heal_seq, seed=0)
    held_out = heal.token_batches(ids, vocab, seq_len=args.heal_seq, seed=1)
    evals = [held_out(i) for i in range(2)]
    cfg = heal.HealConfig(steps=args.heal, lr=args.heal_lr)
    start = time.perf_counter()
    with threads_for(teacher):
        before = heal.quantised_loss(teacher, teacher, evals, selector)
        with heal_progress(args.heal, err, args.quiet) as on_step:
            student, _ = heal.heal_copy(teacher, train, cfg, selector, on_step)
        after = heal.quantised_loss(student, teacher, evals, selector)
    if not args.quiet:
        print(
            f"heal: {args.heal} steps in {time.perf_counter() - start:.1f} s, held-out distillation loss "
            f"(ternary) {before:.4g} -> {after:.4g}",
            file=out,
        )
    entries = source.tensors
    state = {k: v.detach().to(entries[k].dtype) for k, v in student.state_dict().items() if k in entries}
    return DictSource(state, source.config)


@contextlib.contextmanager
def heal_progress(steps: int, err: TextIO, quiet: bool) -> Iterator[Callable[[int, float, float], None]]:
    """A bar on ``err`` that moves one step at a time and shows the distillation loss and the
    quantisation strength lambda; yields the ``on_step`` callback for :func:`heal.heal`."""
    from tqdm import tqdm

    # mininterval=0: every step is drawn (a step takes milliseconds to a second; drawing is cheaper)
    bar = tqdm(total=steps, desc="healing", unit="step", file=err, disable=quiet, mininterval=0)

    def on_step(step: int, loss: float, lam: float) -> None:
        bar.set_postfix_str(f"loss {loss:.4g}, lambda {lam:.2f}", refresh=False)
        bar.update(1)

    try:
        yield on_step
    finally:
        bar.close()


def _report(stats: list[LayerStat], kept: dict[str, str], out: TextIO) -> None:
    for s in stats:
        shape = "x".join(str(d) for d in s.shape)
        note = " (already ternary)" if s.already_ternary else ""
        print(f"  {s.name}  [{shape}]  zeros {100 * s.zero_fraction:.1f}%{note}", file=out)
    for module, reason in sorted(kept.items()):
        print(f"  {module}: kept in high precision ({reason})", file=out)


def _write_hf(
    data: TensorSource, source: ModelSource, selector: TensorSelector, args: BitnetOptions, folder: Path
) -> tuple[list[LayerStat], dict[str, str]]:
    """Stream the transformers export into ``folder``: shards laid out from the plan, each converted
    tensor written at its offset as soon as it exists."""
    from mergesmith.bitnet.convert import plan_hf_export
    from mergesmith.bitnet.io import extra_files, write_hf_stream
    from mergesmith.core.sizes import parse_size
    from mergesmith.core.write import copy_files, write_json

    shard_bytes = parse_size(args.out_shard_size)
    if shard_bytes <= 0:
        raise MergeError("--out-shard-size must be positive")
    plan = plan_hf_export(data, selector, args.linear_class)
    if not plan.ternary:
        raise MergeError(
            f"no weight of {args.model} was selected for ternarisation (check --include/--exclude)"
        )
    stats = write_hf_stream(folder, data, plan, shard_bytes)
    write_json(folder / "config.json", plan.config)
    copy_files(extra_files(source.path, source.ref), folder)
    return stats, plan.kept


def _write_gguf(
    data: TensorSource,
    source: ModelSource,
    selector: TensorSelector,
    args: BitnetOptions,
    path: Path,
    err: TextIO,
) -> tuple[list[LayerStat], dict[str, str], str]:
    """Stream the GGUF export into the file ``path``: header from the plan, then each tensor.
    Returns the stats, the selected matrices kept in high precision, and a summary line."""
    from mergesmith.bitnet.convert import iter_gguf_tensors, plan_gguf_export
    from mergesmith.bitnet.gguf_export import gguf_file_type, llama_metadata
    from mergesmith.bitnet.gguf_tokenizer import tokenizer_metadata
    from mergesmith.bitnet.io import read_json, write_gguf_stream

    plan = plan_gguf_export(data, selector, args.gguf_type)
    if not plan.chosen:
        raise MergeError(f"no weight of {args.model} was ternarised (check --include/--exclude)")
    config = data.config
    tok_kv, note = tokenizer_metadata(
        read_json(source.path, "tokenizer.json", source.ref),
        read_json(source.path, "tokenizer_config.json", source.ref),
        int(config["vocab_size"]),
        config,
    )
    if note:
        print(f"mergesmith: note: {note}", file=err)
    file_type, counts = gguf_file_type(plan.layouts)
    meta = llama_metadata(config, args.gguf_type, source.path.resolve().name, file_type) + tok_kv
    stats: list[LayerStat] = []

    def tensors() -> Any:
        for tensor, stat, _ in iter_gguf_tensors(data, plan):
            if stat is not None:
                stats.append(stat)
            yield tensor

    write_gguf_stream(path, "llama", meta, plan.layouts, tensors())
    return stats, plan.kept, _gguf_summary(args.gguf_type, plan, counts, file_type)


def _gguf_summary(qtype: str, plan: Any, counts: dict[str, int], file_type: Any) -> str:
    """One line: how many selected matrices are ternary, how many stayed high precision and why, and
    the share of matrix weights behind ``general.file_type``."""
    ternary = qtype.upper()
    share = counts.get(ternary, 0) / max(sum(counts.values()), 1)
    kept = (
        f", {len(plan.kept)} kept in high precision (in_features not a multiple of 256, the width "
        "of a TQ block)"
        if plan.kept
        else ""
    )
    return (
        f"GGUF: {len(plan.chosen)} of {len(plan.chosen) + len(plan.kept)} selected matrices are {ternary}"
        f"{kept}; {ternary} holds {100 * share:.1f}% of the matrix weights, general.file_type = "
        f"{file_type.name}"
    )


@contextmanager
def _gguf_file(target: Path, overwrite: bool) -> Iterator[Path]:
    """A temporary file beside ``target`` that replaces it (``os.replace``, after fsync) when the
    block ends without an error, and is removed otherwise. The caller holds ``target``'s output lock
    and has checked it against the inputs (:func:`mergesmith.core.write.check_relations`)."""
    if target.is_dir():
        raise MergeError(f"OUT {target} is a folder; a path ending in .gguf names the file to write")
    if target.exists() and not overwrite:
        raise MergeError(f"output file {target} already exists; pass --overwrite to replace it")
    if not target.parent.is_dir():
        raise MergeError(f"folder {target.parent} of OUT {target} does not exist")
    try:
        fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent)
    except OSError as exc:
        raise MergeError(f"cannot create a file next to {target}: {exc.strerror}") from None
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file the usual permissions
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def _bytes_on_disk(source: ModelSource) -> int:
    return sum(f.stat().st_size for f in {info.file for info in source.tensors.values()})


def _warn_about_input(
    source: ModelSource, args: BitnetOptions, selector: TensorSelector, err: TextIO
) -> None:
    """Warnings about MODEL before the export: float weights that are not ternary yet, and remote code
    that the output does not carry."""
    from mergesmith.core.hf_load import drop_remote_code

    if not args.heal:
        warn_if_float(source, selector, args.model, err)
    remote = drop_remote_code(dict(source.config), args.model)  # export_config drops auto_map
    if remote:
        print(f"mergesmith: warning: {remote}", file=err)


def _check_options(args: BitnetOptions) -> None:
    """What can be checked before MODEL is opened (so that no warning about it comes first)."""
    import math

    from mergesmith.core.sizes import parse_size

    if args.format == "hf" and parse_size(args.out_shard_size) < 1:
        raise MergeError(f"--out-shard-size must be at least 1 byte, got {args.out_shard_size!r}")
    if args.heal < 0:
        raise MergeError(f"--heal needs a number of steps of at least 0 (0: no healing), got {args.heal}")
    if args.heal and not (math.isfinite(args.heal_lr) and args.heal_lr > 0):
        raise MergeError(f"--heal-lr must be a positive number, got {args.heal_lr}")
    if args.heal and args.heal_seq < 2:
        raise MergeError(f"--heal-seq must be at least 2 tokens (one to predict from), got {args.heal_seq}")


def export(args: BitnetOptions, out: TextIO | None = None, err: TextIO | None = None) -> Path:
    """Export as ``args`` say; the report goes to ``out``, notes and warnings to ``err`` (default: the
    standard streams). Returns the path written. Expected failures raise MergeError."""
    from mergesmith.bitnet.io import dir_size
    from mergesmith.core.model import check_unchanged
    from mergesmith.core.sizes import size_change
    from mergesmith.core.sources import open_source
    from mergesmith.core.write import OutputFolder, check_relations, input_paths, output_lock

    out = out or sys.stdout
    err = err or sys.stderr
    selector = _selector(args)
    _check_options(args)
    if args.out_dir.endswith(".gguf") and args.format != "gguf":
        raise MergeError(f"OUT {args.out_dir} ends in .gguf: add --format gguf, or name a folder")
    inputs = input_paths([args.model, args.heal_data])
    summary = None
    if args.format == "gguf" and args.out_dir.endswith(".gguf"):
        target = Path(args.out_dir)
        check_relations(target, inputs)  # before the lock file is created beside it
        with output_lock(target), _gguf_file(target, args.overwrite) as path:
            source = open_source(args.model)
            try:
                _warn_about_input(source, args, selector, err)
                data = _heal_source(source, args, selector, out, err) if args.heal else source
                stats, kept, summary = _write_gguf(data, source, selector, args, path, err)
                check_unchanged([source])
                before = _bytes_on_disk(source)
            finally:
                source.close()
        size_after = target.stat().st_size
    else:
        with OutputFolder(args.out_dir, args.overwrite, force=args.force, inputs=inputs) as folder:
            source = open_source(args.model)
            try:
                _warn_about_input(source, args, selector, err)
                data = _heal_source(source, args, selector, out, err) if args.heal else source
                if args.format == "hf":
                    stats, kept = _write_hf(data, source, selector, args, folder.path)
                else:
                    gguf_path = folder.path / "model.gguf"
                    stats, kept, summary = _write_gguf(data, source, selector, args, gguf_path, err)
                size_after = dir_size(folder.path)
                folder.commit([source])
                before = _bytes_on_disk(source)
            finally:
                source.close()
    if args.quiet:
        return Path(args.out_dir)
    print(f"{len(stats)} weights ternarised:", file=out)
    _report(stats, kept, out)
    if summary:
        print(summary, file=out)
    print(
        f"size: {size_change(before, size_after)}, written to {args.out_dir}",
        file=out,
    )
    return Path(args.out_dir)
