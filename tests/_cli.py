"""Running a parsed sub-command in-process with its standard streams captured."""

import contextlib
import io


def run_command(args, out: io.StringIO | None = None, err: io.StringIO | None = None) -> int:
    """``args.func(args)`` (every command's handler is ``run(args) -> int``) with stdout and stderr going
    to ``out`` and ``err``."""
    with contextlib.redirect_stdout(out or io.StringIO()), contextlib.redirect_stderr(err or io.StringIO()):
        return args.func(args)
