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


def describe_load_error(e: BaseException) -> str:
    """One line on why a file failed to load: the first line of ``e``, or, for a pickle that
    ``torch.load(weights_only=True)`` refused, that it was refused."""
    import pickle

    if isinstance(e, pickle.UnpicklingError):
        return "refused a pickle that holds more than tensors (loading it could run code)"
    return (str(e).strip().splitlines() or [type(e).__name__])[0]
