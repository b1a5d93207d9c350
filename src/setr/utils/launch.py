"""The entry-point wrapper: every ``src/<task>.py`` runs its ``@hydra.main`` function through :func:`launch`.

A mistake the user can fix (a config group option that does not exist, a bad override, a missing mandatory key,
a bad value or file caught by the project's checks) ends the process with ONE line ``error: ...`` on stderr and
exit code 2, instead of Hydra's several lines or a traceback. :func:`task_wrapper` goes around the task itself,
once per job: it always finishes an active W&B run, so every job of a ``-m`` sweep gets its own run.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from functools import wraps
from typing import Any

from setr.errors import SETRConfigError


def launch(main: Callable[[], Any], prepare: Callable[[list[str]], list[str]] | None = None) -> None:
    """Run ``main`` (a ``@hydra.main`` function) with one-line errors and exit code 2.

    ``prepare`` rewrites the command line before Hydra parses it (``resume=auto`` in src/train.py)."""
    from hydra.errors import HydraException
    from omegaconf.errors import MissingMandatoryValue

    os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra re-raises instead of printing; reported below in one line
    try:
        from setr import check_torch_version

        check_torch_version()
        if prepare is not None:
            sys.argv = prepare(list(sys.argv))
        main()
    except (SETRConfigError, MissingMandatoryValue) as e:
        _fail(user_error_line(e))
    except HydraException as e:
        _fail(hydra_error_line(e))


def user_error_line(e: BaseException) -> str:
    """The message of a mistake the user can fix: a project check, or a mandatory ``???`` key left unset."""
    from omegaconf.errors import MissingMandatoryValue

    if isinstance(e, MissingMandatoryValue):
        key = getattr(e, "full_key", None) or "config"
        return f"{key}: required; pass {key}=<value> on the command line"
    return str(e)


def _fail(message: str) -> None:
    sys.stdout.flush()
    print("error: " + " ".join(message.split()), file=sys.stderr, flush=True)  # always one line
    raise SystemExit(2)


def hydra_error_line(e: BaseException) -> str:
    """One line for a Hydra composition error (unknown group option, bad override, unknown key)."""
    from hydra.errors import MissingConfigException

    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    if isinstance(e, MissingConfigException):
        line = lines[0] if lines else "config not found"
        if e.options:
            line += f"; available: {', '.join(sorted(e.options))}"
        return line
    line = " ".join(lines[:3]) or type(e).__name__
    if e.__cause__ is not None:
        cause = str(e.__cause__).strip().splitlines()
        if cause and cause[0] not in line:
            line += f" ({cause[0]})"
    return line


def task_wrapper(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Around one job of a task: an active W&B run is always finished, whether the job ends or fails, and a
    mistake the user can fix ends the process with one ``error:`` line and exit code 2 from inside the job (an
    exception leaving the job would make Hydra print a line of its own first)."""
    from omegaconf.errors import MissingMandatoryValue

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (SETRConfigError, MissingMandatoryValue) as e:
            _fail(user_error_line(e))
        finally:
            finish_wandb()

    return wrapper


def finish_wandb() -> None:
    if "wandb" in sys.modules:
        import wandb

        if wandb.run is not None:
            wandb.finish()
