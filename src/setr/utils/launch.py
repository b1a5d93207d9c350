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
        from setr.utils.distributed import quiet_rank_argv

        check_torch_version()
        if prepare is not None:
            sys.argv = prepare(list(sys.argv))
        sys.argv = quiet_rank_argv(list(sys.argv))  # a node or task of rank > 0: no .hydra or log of its own
        main()
    except (SETRConfigError, MissingMandatoryValue) as e:
        _fail(user_error_line(e))
    except HydraException as e:
        _fail(hydra_error_line(e))
    _fail_if_jobs_failed()


def _fail_if_jobs_failed() -> None:
    """A ``-m`` sweep whose jobs did not all succeed is not a success: one line, exit code 1."""
    from setr.utils.sweep_summary import FAILED

    if FAILED:
        sys.stdout.flush()
        print(f"error: sweep: {len(FAILED)} job(s) failed ({', '.join(r['job'] for r in FAILED)}); "
              f"see {FAILED[0]['summary']}", file=sys.stderr, flush=True)
        raise SystemExit(1)


def user_error_line(e: BaseException) -> str:
    """The message of a mistake the user can fix: a project check, or a mandatory ``???`` key left unset."""
    from omegaconf.errors import MissingMandatoryValue

    if isinstance(e, MissingMandatoryValue):
        from setr.utils.schema import missing_line

        return missing_line(getattr(e, "full_key", None) or "config")
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
    exception leaving the job would make Hydra print a line of its own first).

    In a ``-m`` sweep a failing job does not end the sweep: its one-line reason is printed and recorded in its
    folder (``job_status.json``, with the traceback), it returns NaN (an Optuna study records a failed trial) and
    the next job runs; the sweep's summary lists it and the process exits non-zero at the end. A run stopped by
    a signal (:class:`setr.errors.Preempted`) prints what it saved and how to resume, and stops a sweep too."""
    from omegaconf.errors import MissingMandatoryValue

    from setr.errors import Preempted

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from setr.utils.distributed import is_rank_zero
        from setr.utils.sweep_summary import in_multirun, record_failure

        try:
            return fn(*args, **kwargs)
        except Preempted as e:
            from setr.utils.distributed import is_ddp_child

            if is_rank_zero():
                sys.stdout.flush()
                print("stopped: " + " ".join(e.message.split()), file=sys.stderr, flush=True)
            if is_ddp_child():  # exit 0: Lightning's process observer in rank 0 kills rank 0 on a child's failure
                raise SystemExit(0) from None
            raise
        except (SETRConfigError, MissingMandatoryValue) as e:
            if not in_multirun():
                _fail(user_error_line(e))
            return _job_failed(user_error_line(e), e, record_failure)
        except Exception as e:
            if not in_multirun():
                raise
            first = str(e).strip().splitlines()
            return _job_failed(f"{type(e).__name__}: {first[0]}" if first else type(e).__name__, e, record_failure,
                               traceback=True)
        finally:
            finish_wandb()

    return wrapper


def _job_failed(reason: str, error: BaseException, record: Callable[..., None], traceback: bool = False) -> float:
    from hydra.core.hydra_config import HydraConfig

    reason = " ".join(reason.split())
    record(reason, error)
    hc = HydraConfig.get()
    where = f"job {hc.job.num} ({hc.runtime.output_dir})"
    hint = " (traceback in its job_status.json)" if traceback else ""
    sys.stdout.flush()
    print(f"error: {where} failed: {reason}{hint}; the sweep goes on", file=sys.stderr, flush=True)
    return float("nan")


def finish_wandb() -> None:
    if "wandb" in sys.modules:
        import wandb

        if wandb.run is not None:
            wandb.finish()
