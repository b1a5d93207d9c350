"""One exception type for every user-facing mistake.

Entry points catch :class:`SETRConfigError` (and its subclasses) and print its message as a single line, so
a wrong key, a missing file or bad data never ends in a traceback from deep inside a library.

An error raised inside a DataLoader worker process (a bad image read by ``data.num_workers > 0`` workers, the
real datasets' default) reaches the main process rebuilt by torch's ``ExceptionWrapper.reraise()`` as
``DataError("Caught DataError in DataLoader worker process 0.\\nOriginal Traceback ...")``: the worker's whole
traceback as the message. The constructor recognises that form and keeps only the original message, so every
catcher (the entry points, a notebook, Lightning's teardown) sees the same one line naming the file.
"""

from __future__ import annotations

import re

# torch/utils/data/_utils/__init__.py, ExceptionWrapper.reraise: f"Caught {name} {where}.\nOriginal {traceback}"
_WORKER_WRAPPED = re.compile(r"Caught \w+ in .*\.\nOriginal ")


def _original_message(msg: str, cls: type[BaseException]) -> str:
    """The message the worker raised, taken from the last ``<module>.<class>: <message>`` line of its traceback
    (a chained cause comes first, the exception itself last); unknown layouts fall back to the last line."""
    if not _WORKER_WRAPPED.match(msg):
        return msg
    lines = msg.rstrip("\n").splitlines()
    prefix = f"{cls.__module__}.{cls.__qualname__}: "
    return next((ln[len(prefix):] for ln in reversed(lines) if ln.startswith(prefix)), lines[-1])


class SETRConfigError(ValueError):
    """A configuration value, file or dataset that cannot be used; the message names it and says why."""

    def __init__(self, *args: object) -> None:
        if len(args) == 1 and isinstance(args[0], str):
            args = (_original_message(args[0], type(self)),)
        super().__init__(*args)


class DataError(SETRConfigError):
    """A dataset file or folder that is missing, unreadable or inconsistent (names the file)."""


class TrainingDiverged(SETRConfigError):
    """The training loss became NaN or infinite; the message names the step and the settings that prevent it."""


class Preempted(SystemExit):
    """A training run stopped on a signal (SIGTERM, SIGINT, SIGUSR1; :mod:`setr.training.preemption`); ``code`` is
    ``128 + signal number``, ``message`` says what was saved and how to resume.

    A ``SystemExit`` and not an ``Exception``: nothing on the way treats it as a failure to report or to skip (a
    ``-m`` sweep stops too instead of recording a failed job and starting the next one)."""

    def __init__(self, signum: int, message: str, agreed: bool = True) -> None:
        super().__init__(128 + signum)
        self.signum = signum
        self.message = message
        self.agreed = agreed  # every rank stopped at the same point (False: this process stopped at once)

    def __str__(self) -> str:
        return self.message
