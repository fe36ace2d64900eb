"""The one exception type that the CLI turns into a one-line message and exit code 2."""


class MergeError(Exception):
    """An expected failure caused by the user's input (config, models, paths).

    The message is shown to the user as one line, so it names the model, the tensor and what to do.
    """


class ConfigError(MergeError):
    """The configuration file is malformed or inconsistent."""


def one_line(message: str) -> str:
    """``message`` with every character that breaks a line (those ``str.splitlines`` splits at: a config
    key may hold ``\\r``) written as its escape, so that an error is one line whatever the input held."""
    return "".join(repr(ch)[1:-1] if len(f"a{ch}b".splitlines()) > 1 else ch for ch in message)
