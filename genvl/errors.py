"""Exceptions that carry a message meant for the user.

The CLI turns any :class:`GenvlError` into one line on stderr and exit status 2; anything else
is a bug and is reported as such.
"""


class GenvlError(Exception):
    """Bad input from the user: a path, a value, a file. The message says what and where."""


class ConfigError(GenvlError):
    """A config file or ``--set`` override that does not fit the config dataclass."""


class DataError(GenvlError):
    """A dataset that is missing, empty, or in no known format."""


class ModelDirError(GenvlError):
    """A model directory that is missing, incomplete, or does not match its config."""


class TrainingError(GenvlError):
    """A training run that cannot go on (for example, a non-finite loss)."""
