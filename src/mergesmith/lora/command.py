"""``mergesmith extract-lora``: a PEFT LoRA adapter from the difference between a fine-tune and its base."""

from __future__ import annotations

import argparse
from typing import Any

from mergesmith.core.cliargs import add_device, add_output_folder, add_verbosity

DESCRIPTION = """\
Extract a LoRA adapter: for every 2-D weight inside the decoder layers (and, with
--include-embeddings, the embeddings and lm_head), the difference MODEL - BASE is factored by a
truncated SVD into PEFT's lora_B @ lora_A at rank --rank. The result is a PEFT adapter folder
(adapter_config.json, adapter_model.safetensors) that peft's PeftModel.from_pretrained loads, and that
mergesmith applies with a BASE+OUT_DIR model reference.

A table of the relative reconstruction error ||delta - B A||_F / ||delta||_F of every module is printed
and saved, with the tensors that differ but cannot be in a LoRA (norms, biases), in
OUT_DIR/lora_report.json. The output is written to a temporary folder beside OUT_DIR and renamed when
complete. See docs/lora.md."""


def register(subparsers: Any) -> None:
    """Add the ``extract-lora`` sub-command."""
    p = subparsers.add_parser(
        "extract-lora",
        help="extract a PEFT LoRA adapter from a fine-tune and its base (truncated SVD)",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("out_dir", metavar="OUT_DIR", help="adapter folder to write (see --overwrite)")
    p.add_argument("--base", required=True, metavar="BASE", help="the base model (folder or Hub name)")
    p.add_argument("--model", required=True, metavar="MODEL", help="the fine-tuned model")
    p.add_argument(
        "--rank", type=int, required=True, metavar="R", help="LoRA rank (thinner matrices keep theirs)"
    )
    p.add_argument(
        "--include-embeddings",
        action="store_true",
        help="also factor the input embeddings (as PEFT embedding LoRA) and an untied lm_head",
    )
    p.add_argument(
        "--save-norms",
        action="store_true",
        help="also save norms (modules whose parameters are all vectors) that differ, whole, as PEFT "
        "modules_to_save; some serving engines do not load modules_to_save",
    )
    p.add_argument(
        "--include",
        action="append",
        default=[],
        metavar="REGEX",
        help="only modules whose name matches (re.search; repeatable)",
    )
    p.add_argument(
        "--exclude",
        action="append",
        default=[],
        metavar="REGEX",
        help="leave out matching modules (repeatable)",
    )
    p.add_argument(
        "--dtype",
        choices=("float32", "float16", "bfloat16"),
        help="dtype of the saved factors (default: the fine-tuned model's)",
    )
    add_device(p, "where the SVDs run")
    add_output_folder(p)
    add_verbosity(p, "no progress bar or table")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run the command; returns 0. Expected failures raise MergeError."""
    from mergesmith.lora.extract import extract_lora, format_table

    reports = extract_lora(
        args.base,
        args.model,
        args.out_dir,
        rank=args.rank,
        include_embeddings=args.include_embeddings,
        include=args.include,
        exclude=args.exclude,
        save_norms=args.save_norms,
        dtype=args.dtype,
        device=args.device,
        overwrite=args.overwrite,
        force=args.force,
        quiet=args.quiet,
    )
    if not args.quiet:
        print(format_table(reports))
    return 0
