"""User errors: mistakes in the data, a checkpoint or the configuration that the user can fix.

``run.py`` prints them as one message (no traceback; ``HYDRA_FULL_ERROR=1`` shows it); every
other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

from data_modules.types import DataError
from src.inference import ModelFileError
from src.models.weight_formats import CheckpointError


class ConfigError(ValueError):
    """A config value is missing, invalid or contradicts a checkpoint; the message names the key."""


USER_ERRORS = (ConfigError, DataError, CheckpointError, ModelFileError, FileNotFoundError)


def user_error(err: BaseException) -> BaseException | None:
    """The user error behind ``err`` (itself, or what it was raised from, e.g. inside Hydra's
    ``instantiate``), or None when ``err`` is not one."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, USER_ERRORS):
            return _unwrapped(err)
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


def _unwrapped(err: BaseException) -> BaseException:
    """A user error raised in a data-loader worker reaches this process as the same type whose
    message is torch's "Caught <type> in DataLoader worker process N" and the worker's traceback:
    the error with the original message alone (caused by the wrapped one)."""
    text = str(err)
    kind = type(err).__qualname__ if type(err).__module__ == "builtins" else f"{type(err).__module__}.{type(err).__qualname__}"
    marker = f"\n{kind}: "
    if not (text.startswith("Caught ") and "Original Traceback" in text and marker in text):
        return err
    original = type(err)(text[text.rindex(marker) + len(marker):].strip())
    original.__cause__ = err
    return original
