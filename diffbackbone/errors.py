"""The package's own error types: what a user can fix. `diffbackbone` (the CLI) prints them as one `error:` line and
exits 2; any other exception is a bug in our code and shows its traceback."""
from __future__ import annotations

__all__ = ['DiffbackboneError', 'InputError', 'InputTypeError']


class DiffbackboneError(Exception):
    """Base of every error a user can fix (bad argument, missing file, unusable weights)."""


class InputError(DiffbackboneError, ValueError):
    """A bad argument value or input (a ValueError, as Python and timm users expect)."""


class InputTypeError(DiffbackboneError, TypeError):
    """An argument of the wrong type (a TypeError)."""
