"""``mergesmith search SEARCH.yml OUT_DIR``: evolutionary search of a merge recipe."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from mergesmith.core.cliargs import add_verbosity, positive_int, seed_int

HELP = "search merge recipes (per-layer weights, densities) against a fitness, resumable, on Ray too"
DESCRIPTION = """\
Search the merge parameters of SEARCH.yml's genome (mergekit-evolve's format, read strictly) with CMA-ES
(or random / TPE), merging each candidate in memory and scoring it on the config's tasks. Writes
OUT_DIR/best.yml (a plain merge config), candidates.csv, summary.json, search.png and the merged best
model (OUT_DIR/model, unless --no-model). OUT_DIR/journal lets an interrupted search continue: rerun the
same command (or add --resume). See docs/search.md.
"""


def ray_address(text: str) -> str:
    """argparse ``type=`` of ``--ray``'s optional ADDRESS: a bare ``--ray`` before the positionals would
    take SEARCH.yml (or OUT_DIR) as its address, and the error would be a missing OUT_DIR."""
    if text in ("auto", "local") or ":" in text:
        return text
    raise argparse.ArgumentTypeError(
        f"{text!r} is not a Ray address (auto, local, HOST:PORT or ray://HOST:PORT); give a bare --ray after "
        "SEARCH.yml OUT_DIR"
    )


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "search", help=HELP, description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("config", metavar="SEARCH.yml", help="search config (genome, tasks, optimizer)")
    p.add_argument(
        "out_dir", metavar="OUT_DIR", help="new or empty folder, or the folder of a search to continue"
    )
    p.add_argument(
        "--max-evals",
        type=positive_int,
        default=100,
        metavar="N",
        help="candidates to evaluate (default: 100)",
    )
    p.add_argument("--seed", type=seed_int, default=0, metavar="N", help="optimiser seed (default: 0)")
    p.add_argument(
        "--workers",
        type=positive_int,
        default=None,
        metavar="N",
        help="candidates evaluated at once: worker processes, or Ray actors (default: 1; with --ray, "
        "one per CPU of the Ray cluster)",
    )
    p.add_argument(
        "--ray",
        nargs="?",
        const=True,
        default=False,
        type=ray_address,
        metavar="ADDRESS",
        help="evaluate on Ray: a local one, or the cluster at ADDRESS (pip install 'mergesmith[search]')",
    )
    p.add_argument("--resume", action="store_true", help="continue the search journalled in OUT_DIR")
    p.add_argument("--no-model", action="store_true", help="do not write the merged best model")
    add_verbosity(p, "no progress bar and no closing table")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from mergesmith.search.run import search

    try:
        search(
            args.config,
            args.out_dir,
            max_evals=args.max_evals,
            seed=args.seed,
            workers=args.workers,
            ray=args.ray,
            resume=args.resume,
            write_model=not args.no_model,
            quiet=args.quiet,
        )
    except KeyboardInterrupt:
        print(
            f"mergesmith: interrupted; the journal in {args.out_dir} keeps what was evaluated: rerun the same "
            "command to continue",
            file=sys.stderr,
        )
        return 130
    return 0
