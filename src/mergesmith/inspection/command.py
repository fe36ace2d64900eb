"""``mergesmith inspect``: what a merge will do to its models (and, with --merged, what it did).

A report, not a merge: incompatible models give a verdict and exit code 0; only inputs that cannot be read
(a missing folder, a broken header, a config with errors) give one line and exit code 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from mergesmith.core.cliargs import add_verbosity, positive_int
from mergesmith.core.errors import MergeError

HELP = "see what a merge does to its models: compatibility, task-vector conflicts per layer, plots"
DESCRIPTION = """\
Inspect a merge before running it, or explain one after it:

  mergesmith inspect CONFIG.yml [--report OUT.html] [--json OUT.json]
  mergesmith inspect MODEL... --base BASE
  mergesmith inspect --merged OUT_DIR CONFIG.yml

First the compatibility section, from headers, config.json and tokenizer files (architecture, layers,
shapes, vocabulary and tokenizer, tied embeddings, rope settings, dtypes); then every tensor is streamed
as a merge streams it (bounded memory) to measure each task vector (model - base) per layer and module:
its norm relative to the base, pairwise cosines and sign conflicts, and what the config's method does
there (TIES: trimmed and lost to the sign election; DARE: expected kept mass; SLERP: angle). A model
whose distance to the base is too large is named as not a fine-tune of it. See docs/inspect.md.
"""


def register(subparsers: Any) -> None:
    """Add the ``inspect`` sub-command to the mergesmith CLI."""
    p = subparsers.add_parser(
        "inspect", help=HELP, description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "inputs", nargs="+", metavar="CONFIG.yml|MODEL", help="a merge config, or models (with --base)"
    )
    p.add_argument("--base", metavar="MODEL", help="the base model (default: the config's base_model)")
    p.add_argument(
        "--merged", metavar="OUT_DIR", help="a merged model to explain: its distance to each parent"
    )
    p.add_argument(
        "--report", metavar="OUT.html", help="write a self-contained HTML report (needs matplotlib)"
    )
    p.add_argument("--json", metavar="OUT.json", help="write every figure as JSON ('-': standard output)")
    p.add_argument(
        "--overwrite", action="store_true", help="replace the --report / --json files if they exist"
    )
    p.add_argument(
        "--top",
        type=positive_int,
        default=12,
        metavar="N",
        help="layer/module rows in the table (default: 12)",
    )
    add_verbosity(p, "no progress bar on stderr")
    p.set_defaults(func=run)


def _input_paths(args: argparse.Namespace) -> list[tuple[str, Path]]:
    """(as given, real path) of everything this run reads: the inputs, --base, --merged and the models a
    config names (its errors are left to the inspection, which reports them)."""
    from mergesmith.core.write import input_paths
    from mergesmith.inspection.analyse import config_refs

    refs = [*args.inputs, args.base, args.merged]
    if len(args.inputs) == 1 and Path(args.inputs[0]).is_file():
        from mergesmith.pipeline.config import load_config

        try:
            config = load_config(args.inputs[0])
            refs += [*config_refs(config), config.base_model]
        except MergeError:
            pass
    return [(str(p), Path(os.path.realpath(p))) for p in input_paths(refs)]


def run(args: argparse.Namespace) -> int:
    """Check the outputs, inspect, print; 2 if --report was asked for and matplotlib is missing."""
    from mergesmith.inspection import report as out
    from mergesmith.inspection.analyse import inspect_models

    if args.report == "-":  # it would be a file named '-'
        raise MergeError(
            "--report -: the HTML report is written to a file; give a file name (--json - prints)"
        )
    inputs = _input_paths(args)
    for flag, name in (("--report", args.report), ("--json", args.json)):
        if not name or name == "-":
            continue
        real = Path(os.path.realpath(name))
        for given, path in inputs:
            if real == path or path in real.parents:
                how = "is" if real == path else "is inside"
                raise MergeError(f"{flag} {name} {how} the input {given} of this run; give another file name")
    report_path = out.check_output_file(args.report, args.overwrite, "--report") if args.report else None
    json_path = (
        out.check_output_file(args.json, args.overwrite, "--json") if args.json and args.json != "-" else None
    )
    if report_path is not None and json_path is not None and report_path.resolve() == json_path.resolve():
        raise MergeError(f"--report and --json name the same file {args.report}; give two names")
    no_plots = out.check_matplotlib() if report_path is not None else None
    to_stdout = args.json == "-"

    def on_compat(header: dict[str, Any]) -> None:  # printed before any tensor is read
        if not to_stdout:
            print("\n".join(out.compat_lines(header, header["base"], header["models"])), flush=True)

    result = inspect_models(
        args.inputs, base=args.base, merged=args.merged, quiet=args.quiet, on_compat=on_compat
    )
    if to_stdout:
        sys.stdout.write(out.to_json_text(result))
    else:
        print(out.terminal(result, args.top))
    if json_path is not None:
        out.write_output_file(json_path, out.to_json_text(result), args.overwrite)
    if report_path is not None:
        if no_plots is not None:
            print(f"mergesmith: error: {no_plots}", file=sys.stderr)
            return 2
        out.write_output_file(report_path, out.to_html(result, args.top), args.overwrite)
        if not to_stdout:
            print(f"report written to {report_path}")
    return 0
