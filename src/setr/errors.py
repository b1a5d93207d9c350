"""One exception type for every user-facing mistake.

Entry points catch :class:`SETRConfigError` (and its subclasses) and print its message as a single line, so
a wrong key, a missing file or bad data never ends in a traceback from deep inside a library.
"""

from __future__ import annotations


class SETRConfigError(ValueError):
    """A configuration value, file or dataset that cannot be used; the message names it and says why."""


class DataError(SETRConfigError):
    """A dataset file or folder that is missing, unreadable or inconsistent (names the file)."""
