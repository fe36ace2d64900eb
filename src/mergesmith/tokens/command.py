"""``mergesmith tokensurgeon MODEL DONOR OUT_DIR``: MODEL with DONOR's tokenizer."""

from __future__ import annotations

import argparse
from typing import Any

from mergesmith.core.cliargs import add_device, add_output_folder, add_verbosity, add_workers, positive_int

DESCRIPTION = """\
Transplant DONOR's tokenizer into MODEL: OUT_DIR holds MODEL's weights with its embedding and lm_head
rows in DONOR's token order, DONOR's tokenizer files, and config.json's vocab_size and special token ids
set to DONOR's. A token MODEL lacks gets a row by --init: omp (default; DONOR's row of the token written
as a combination of DONOR's rows of --k tokens both share, by orthogonal matching pursuit, and that
combination of MODEL's rows of the same tokens), mean (MODEL's mean row), zero, or subword (the mean of
MODEL's rows of the pieces its own tokenizer splits the token's text into). Works on tied and untied
embeddings; streams like a merge; nothing is written unless it completes. See docs/config.md,
Tokenizers."""


def register(subparsers: Any) -> None:
    """Add the ``tokensurgeon`` sub-command."""
    p = subparsers.add_parser(
        "tokensurgeon",
        help="give a model another model's tokenizer (rows for new tokens by OMP)",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("model", metavar="MODEL", help="the model whose weights are kept (folder or Hub name)")
    p.add_argument(
        "donor", metavar="DONOR", help="the model whose tokenizer (and embeddings, for OMP) is used"
    )
    p.add_argument("out_dir", metavar="OUT_DIR", help="model folder to write (see --overwrite)")
    p.add_argument(
        "--init",
        choices=("omp", "mean", "zero", "subword"),
        default="omp",
        help="row of a token MODEL lacks (default: omp)",
    )
    p.add_argument(
        "--k", type=positive_int, default=64, metavar="K", help="OMP: shared tokens per row (default 64)"
    )
    add_workers(p, "tensors")
    add_device(p, "where the rows are computed")
    add_output_folder(p)
    add_verbosity(p, "no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run the command; returns 0. Expected failures raise MergeError."""
    from mergesmith.tokens.surgeon import transplant_tokenizer

    out = transplant_tokenizer(
        args.model,
        args.donor,
        args.out_dir,
        init=args.init,
        k=args.k,
        workers=args.workers,
        device=args.device,
        overwrite=args.overwrite,
        force=args.force,
        quiet=args.quiet,
    )
    if not args.quiet:
        print(f"wrote {out}")
    return 0
