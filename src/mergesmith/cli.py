"""Command-line entry point. Thin: parses arguments, calls the library, turns MergeError into exit code 2.

Each sub-command lives beside the code it drives and exposes ``register(subparsers)``, which adds its
parser and sets ``func`` (a callable taking the parsed namespace and returning an exit code).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from typing import NoReturn

from mergesmith.core.errors import MergeError, one_line

# Modules that expose ``register(subparsers)``; order is the order shown in --help.
COMMAND_MODULES = [
    "mergesmith.pipeline.command",
    "mergesmith.inspection.command",
    "mergesmith.eval.command",
    "mergesmith.lora.command",
    "mergesmith.bitnet.command",
    "mergesmith.moe.command",
    "mergesmith.tokens.command",
    "mergesmith.search.command",
]


class _Parser(argparse.ArgumentParser):
    """Bad arguments give one line, like every other expected failure, and exit code 2: argparse's own
    error() would print the whole usage block above it."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    from mergesmith import __version__

    parser = _Parser(
        prog="mergesmith",
        description="Merge fine-tuned language models tensor by tensor on a CPU.",
    )
    parser.add_argument("--version", action="version", version=f"mergesmith {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    for level in (logging.INFO, logging.WARNING, logging.ERROR):  # "mergesmith: warning: ...", like errors
        logging.addLevelName(level, logging.getLevelName(level).lower())
    logging.basicConfig(
        level=logging.WARNING if not getattr(args, "verbose", 0) else logging.INFO,
        format="mergesmith: %(levelname)s: %(message)s",
    )
    try:
        return int(args.func(args) or 0)
    except MergeError as exc:
        print(f"mergesmith: error: {one_line(str(exc))}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # e.g. `mergesmith plan cfg.yml | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        print("mergesmith: interrupted; nothing was written", file=sys.stderr)
        return 130


def entry() -> None:  # pragma: no cover - exercised by the console script
    """The ``mergesmith`` console script: :func:`main`, then exit without the interpreter's teardown.

    Unloading torch's thousands of modules at exit takes about a quarter of a second, which is a tenth
    of a small merge. Everything a command writes is closed (and renamed into place) before main()
    returns; only the standard streams and logging still need flushing.
    """
    code = main()
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (BrokenPipeError, OSError, ValueError):
            pass
    os._exit(code)


if __name__ == "__main__":  # pragma: no cover
    entry()
