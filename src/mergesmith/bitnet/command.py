"""``mergesmith bitnet MODEL OUT_DIR``: ternarise a model and write it for transformers or llama.cpp."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, TextIO

from mergesmith.bitnet import io
from mergesmith.bitnet.convert import LayerStat, export_hf, iter_gguf_tensors, open_source
from mergesmith.bitnet.gguf_export import QTYPES, llama_metadata, tokenizer_metadata
from mergesmith.bitnet.hf import DEFAULT_LINEAR_CLASS, LINEAR_CLASSES, trained_ternary
from mergesmith.bitnet.quant import DEFAULT_INCLUDE, TensorSelector, as_ternary
from mergesmith.errors import MergeError

DESCRIPTION = """\
Turn a model into BitNet b1.58 form: the linear layers of the decoder blocks become ternary
({-1, 0, +1} times one absmean scale per matrix); embeddings, lm_head and norms stay in high
precision. --format hf writes a transformers checkpoint (quant_method "bitnet", 4 weights per byte)
that AutoModelForCausalLM.from_pretrained loads; --format gguf writes OUT_DIR/model.gguf with TQ2_0
(or TQ1_0) matrices for llama.cpp (llama-architecture models).

Ternarising a model that was trained in floating point destroys its quality: BitNet models are
trained ternary. Use this on BitNet-trained weights (latent or packed), or as the starting point of a
quantisation-aware fine-tune. The output is written to a temporary folder beside OUT_DIR and renamed
when complete."""


def register(subparsers: Any) -> None:
    """Add the ``bitnet`` sub-command."""
    p = subparsers.add_parser(
        "bitnet",
        help="ternarise a model (BitNet b1.58) and export it for transformers or llama.cpp",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("model", metavar="MODEL", help="local model folder: config.json and *.safetensors")
    p.add_argument("out_dir", metavar="OUT_DIR", help="output folder (created; see --overwrite)")
    p.add_argument("--format", choices=("hf", "gguf"), default="hf", help="output format (default: hf)")
    p.add_argument(
        "--linear-class",
        choices=LINEAR_CLASSES,
        default=DEFAULT_LINEAR_CLASS,
        help="transformers module for --format hf: autobitlinear unpacks once at load and multiplies "
        "by weight_scale = gamma; bitlinear keeps weights packed in memory and divides by "
        "weight_scale = 1/gamma (default: %(default)s)",
    )
    p.add_argument(
        "--gguf-type", choices=QTYPES, default="tq2_0", help="ternary GGUF type (default: %(default)s)"
    )
    p.add_argument(
        "--include",
        action="append",
        metavar="REGEX",
        help="ternarise only 2-D weights whose name matches (re.search; repeatable; default: "
        f"{DEFAULT_INCLUDE[0]!r}, the decoder blocks)",
    )
    p.add_argument(
        "--exclude",
        action="append",
        metavar="REGEX",
        help="keep matching weights in high precision (repeatable; embeddings, lm_head and norms always are)",
    )
    p.add_argument(
        "--heal",
        type=int,
        default=0,
        metavar="STEPS",
        help="before export, run STEPS of quantisation-aware fine-tuning distilled from the float "
        "model (small models on a CPU; loads the whole model twice)",
    )
    p.add_argument(
        "--heal-data",
        metavar="TEXT_FILE",
        help="UTF-8 text for --heal, tokenised with MODEL's tokenizer (default: random token ids, "
        "which only demonstrates the mechanism)",
    )
    p.add_argument("--heal-lr", type=float, default=1e-3, help="AdamW learning rate for --heal")
    p.add_argument("--heal-seq", type=int, default=64, help="tokens per sequence for --heal")
    p.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it exists")
    p.add_argument("-v", "--verbose", action="count", default=0, help="more log output")
    p.set_defaults(func=run)


def _mib(n: int) -> str:
    return f"{n / 2**20:.2f} MiB"


def _selector(args: argparse.Namespace) -> TensorSelector:
    try:
        return TensorSelector.from_patterns(args.include, args.exclude)
    except ValueError as exc:
        raise MergeError(str(exc)) from exc


def _check_paths(model: Path, out: Path) -> None:
    m, o = model.resolve(), out.resolve()
    if o == m or m.is_relative_to(o) or o.is_relative_to(m):
        raise MergeError(f"OUT_DIR {out} must not be MODEL or be inside it (or contain it)")


def warn_if_float(source: Any, selector: TensorSelector, model: str, err: TextIO) -> None:
    """One line on ``err`` when the first selected weight is not already ternary and the config does
    not say the model was trained ternary."""
    if trained_ternary(source.config):
        return
    for name, shape in source.shapes.items():
        if selector.selects(name, shape):
            if as_ternary(source.get(name)) is None:
                print(
                    f"mergesmith: warning: {model} holds float weights: ternarising a model after "
                    "training destroys its quality (BitNet models are trained ternary); heal it with "
                    "quantisation-aware training before use",
                    file=err,
                )
            return


def _heal_source(
    source: Any, args: argparse.Namespace, selector: TensorSelector, out: TextIO, err: TextIO
) -> Any:
    """Load MODEL in float32, heal a copy, return it as a source with the input's dtypes."""
    import torch
    import transformers

    from mergesmith.bitnet import heal
    from mergesmith.bitnet.convert import DictSource

    if args.heal < 1:
        raise MergeError("--heal needs a positive number of steps")
    if source is not open_source(source):
        raise MergeError("--heal needs float weights; MODEL is a packed BitNet checkpoint")
    try:
        teacher = transformers.AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    except (OSError, ValueError) as exc:
        raise MergeError(f"cannot load {args.model} with transformers for --heal: {exc}") from exc
    ids = None
    if args.heal_data:
        try:
            text = Path(args.heal_data).read_text(encoding="utf-8")
            tokenizer = transformers.AutoTokenizer.from_pretrained(args.model)
        except (OSError, ValueError, UnicodeDecodeError) as exc:
            raise MergeError(f"--heal-data: {exc}") from exc
        ids = torch.tensor(tokenizer(text)["input_ids"], dtype=torch.long)
        if ids.numel() < 2:
            raise MergeError(f"--heal-data {args.heal_data} has no tokens")
    else:
        print("mergesmith: note: --heal without --heal-data distils on random token ids", file=err)
    vocab = int(teacher.config.vocab_size)
    train = heal.token_batches(ids, vocab, seq_len=args.heal_seq, seed=0)
    held_out = heal.token_batches(ids, vocab, seq_len=args.heal_seq, seed=1)
    evals = [held_out(i) for i in range(2)]
    cfg = heal.HealConfig(steps=args.heal, lr=args.heal_lr)
    before = heal.quantised_loss(teacher, teacher, evals, selector)
    student, _ = heal.heal_copy(teacher, train, cfg, selector)
    after = heal.quantised_loss(student, teacher, evals, selector)
    print(
        f"heal: {args.heal} steps, held-out distillation loss (ternary) {before:.4g} -> {after:.4g}", file=out
    )
    shapes = source.shapes
    state = {
        k: v.detach().to(source.dtype(k) if k in shapes else v.dtype)
        for k, v in student.state_dict().items()
        if k in shapes
    }
    return DictSource(state, source.config)


def _report(stats: list[LayerStat], kept: dict[str, str], out: TextIO) -> None:
    for s in stats:
        shape = "x".join(str(d) for d in s.shape)
        note = " (already ternary)" if s.already_ternary else ""
        print(f"  {s.name}  [{shape}]  zeros {100 * s.zero_fraction:.1f}%{note}", file=out)
    for module, reason in sorted(kept.items()):
        print(f"  {module}: kept in high precision ({reason})", file=out)


def _write_hf(
    data: Any, folder: io.SafetensorsFolder, selector: TensorSelector, args: argparse.Namespace, tmp: Path
) -> tuple[Any, Any]:
    result = export_hf(data, selector, args.linear_class)
    if not result.stats:
        raise MergeError(
            f"no weight of {args.model} was selected for ternarisation (check --include/--exclude)"
        )
    io.write_hf_folder(tmp, result.tensors, result.config, folder.extra_files())
    return result.stats, result.kept


def _write_gguf(
    data: Any,
    folder: io.SafetensorsFolder,
    selector: TensorSelector,
    args: argparse.Namespace,
    tmp: Path,
    err: TextIO,
) -> tuple[Any, Any]:
    kept, stream = iter_gguf_tensors(data, selector, args.gguf_type)
    tensors, stats = [], []
    for tensor, stat, _ in stream:
        tensors.append(tensor)
        if stat is not None:
            stats.append(stat)
    if not stats:
        raise MergeError(f"no weight of {args.model} was ternarised (check --include/--exclude)")
    config = open_source(data).config
    tok_kv, note = tokenizer_metadata(
        io.read_json(folder.path / "tokenizer.json"),
        io.read_json(folder.path / "tokenizer_config.json"),
        int(config["vocab_size"]),
    )
    if note:
        print(f"mergesmith: note: {note}", file=err)
    meta = llama_metadata(config, args.gguf_type, Path(args.model).resolve().name) + tok_kv
    io.write_gguf_file(tmp / "model.gguf", "llama", meta, tensors)
    return stats, kept


def run(args: argparse.Namespace, out: TextIO | None = None, err: TextIO | None = None) -> int:
    """Run the command; returns 0. Expected failures raise MergeError."""
    out = out or sys.stdout
    err = err or sys.stderr
    selector = _selector(args)
    source = io.SafetensorsFolder(args.model)
    _check_paths(Path(args.model), Path(args.out_dir))
    if not args.heal:
        warn_if_float(source, selector, args.model, err)
    with io.atomic_output_dir(args.out_dir, args.overwrite) as tmp:
        data = _heal_source(source, args, selector, out, err) if args.heal else source
        if args.format == "hf":
            stats, kept = _write_hf(data, source, selector, args, tmp)
        else:
            stats, kept = _write_gguf(data, source, selector, args, tmp, err)
        size_after = io.dir_size(tmp)
    print(f"{len(stats)} weights ternarised:", file=out)
    _report(stats, kept, out)
    before = source.bytes_on_disk()
    print(
        f"size: {_mib(before)} -> {_mib(size_after)} ({before / max(size_after, 1):.2f}x smaller), "
        f"written to {args.out_dir}",
        file=out,
    )
    return 0
