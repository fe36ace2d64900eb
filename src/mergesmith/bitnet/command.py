"""``mergesmith bitnet MODEL OUT_DIR``: ternarise a model and write it for transformers or llama.cpp.

Importing this module is cheap (no torch): ``mergesmith --help`` builds every sub-command's parser.
The work is :func:`mergesmith.bitnet.export.convert_model`'s, imported inside the handler.
"""

from __future__ import annotations

import argparse
from typing import Any

from mergesmith.core.bitnet.constants import DEFAULT_INCLUDE, DEFAULT_LINEAR_CLASS, LINEAR_CLASSES, QTYPES
from mergesmith.core.cliargs import add_output_folder, add_verbosity, options_from_args
from mergesmith.core.defaults import DEFAULT_SHARD_SIZE

DESCRIPTION = """\
Turn a model into BitNet b1.58 form: the linear layers of the decoder blocks become ternary
({-1, 0, +1} times one absmean scale per matrix); embeddings, lm_head and norms stay in high
precision. --format hf writes a transformers checkpoint (quant_method "bitnet", 4 weights per byte)
that AutoModelForCausalLM.from_pretrained loads; --format gguf writes OUT_DIR/model.gguf (or OUT
itself when it ends in .gguf) with TQ2_0 (or TQ1_0) matrices for llama.cpp (llama-architecture
models).

Ternarising a model that was trained in floating point destroys its quality: BitNet models are
trained ternary. Use this on BitNet-trained weights (latent or packed), or as the starting point of a
quantisation-aware fine-tune. The model is read and written one tensor at a time; the output is
written to a temporary folder beside OUT_DIR and renamed when complete."""


def register(subparsers: Any) -> None:
    """Add the ``bitnet`` sub-command."""
    p = subparsers.add_parser(
        "bitnet",
        help="ternarise a model (BitNet b1.58) and export it for transformers or llama.cpp",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "model",
        metavar="MODEL",
        help="model folder (config.json and *.safetensors), hub id, or MODEL+ADAPTER (a PEFT LoRA applied on read)",
    )
    p.add_argument(
        "out_dir",
        metavar="OUT_DIR",
        help="output folder (created; see --overwrite); with --format gguf, a path ending in .gguf is "
        "the file to write",
    )
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
        "--out-shard-size",
        default=DEFAULT_SHARD_SIZE,
        metavar="SIZE",
        help="largest safetensors shard for --format hf (default 5G; K/M/G)",
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
    add_output_folder(p, "OUT_DIR (or the .gguf file)")
    add_verbosity(p, "no progress bar, per-weight report or size line")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run the command; returns 0. Expected failures raise MergeError."""
    from mergesmith.bitnet.export import BitnetOptions, export

    options = options_from_args(BitnetOptions, args)
    export(options)
    return 0
