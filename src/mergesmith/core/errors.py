"""The one exception type that the CLI turns into a one-line message and exit code 2."""


class MergeError(Exception):
    """An expected failure caused by the user's input (config, models, paths).

    The message is shown to the user as one line, so it names the model, the tensor and what to do.
    """


class ConfigError(MergeError):
    """The configuration file is malformed or inconsistent."""
