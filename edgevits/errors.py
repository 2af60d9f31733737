"""The errors edgevits raises for input a user can fix. Each names what was expected and what was found; the command
line turns every one of them into one line (``edgevits <cmd>: error: ...``) instead of a traceback.

They subclass the built-in exception a caller would expect as well (``ValueError``, ``KeyError``, ...), so code
written against those keeps working."""
from __future__ import annotations


class EdgevitsError(Exception):
    """Base of every error edgevits raises on purpose for bad input."""

    def __str__(self) -> str:  # a KeyError would otherwise print its message in quotes
        return str(self.args[0]) if len(self.args) == 1 else super().__str__()


class UnknownModelError(EdgevitsError, KeyError):
    """A model name that is not registered (the message suggests close names)."""


class ConfigError(EdgevitsError, TypeError):
    """A config field that does not exist (the message names the valid ones)."""


class CheckpointError(EdgevitsError, ValueError):
    """A checkpoint that cannot be read safely or does not fit the model; the message says what was found."""


class InputError(EdgevitsError, TypeError, ValueError):
    """A tensor passed to a model that it cannot take (type, shape, dtype, device, empty batch)."""


class DataError(EdgevitsError, ValueError):
    """A data folder or image that cannot be used as it is."""


class ExportError(EdgevitsError, RuntimeError):
    """An export that failed or whose outputs disagree with PyTorch."""


class EdgevitsWarning(UserWarning):
    """Something a user should know that did not stop the work (the command line prints it as one line)."""


class BackendUnavailable(EdgevitsError, RuntimeError):
    """A backend that cannot run here (missing package, unsupported device or dtype)."""
