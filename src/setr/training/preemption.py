"""Stopping a training run on a signal without losing it: SIGTERM, SIGINT and SIGUSR1 (SLURM's requeue signal).

A cluster ends jobs with a signal: SLURM sends SIGTERM at the time limit, on ``scancel`` and on preemption (and
``--signal=USR1@<s>`` some seconds before the limit), Kubernetes and ``docker stop`` send SIGTERM, a terminal
sends SIGINT. :class:`Preemption` turns each into: a checkpoint at the current step (every rank agreeing on the
step), ``checkpoints/last.ckpt`` written through the trainer's own save, one line with the command that resumes
the run, and exit code ``128 + signal`` (SIGINT 130, SIGUSR1 138, SIGTERM 143). Under SLURM with Lightning's
``SLURMEnvironment(auto_requeue=True)`` (``trainer=slurm``, and what Lightning picks itself in a batch job) the
requeue signal also re-queues the job (``scontrol requeue <job id>``); the re-queued job runs the same command,
which with ``resume=auto`` continues the run.

Why not Lightning's own handler (``_SignalConnector``): it broadcasts inside the signal handler, so a SIGTERM that
interrupts a rank inside the forward pass of DDP pairs that broadcast with the other rank's gradient all-reduce
and both ranks wait forever; the run then exits with code 0 (``SIGTERMException`` is a ``SystemExit`` with no
code) having saved nothing, and SIGUSR1 kills a run outside SLURM. Here the handler only records the signal;
every rank reads the records of all ranks at the same points of the loop (after each training step and each
validation: one all-reduce of two integers, over a CPU group, so no GPU synchronisation), and all stop together.

Where the run stops:

* after a training step with no validation due: the checkpoint is taken there (Lightning resumes it exactly);
* after a step that validates (a ``val_check_interval`` step): the validation runs first, since Lightning skips a
  validation that was due at a step it resumes from; ``last.ckpt`` is then the one written at the end of that
  validation, and the run stops before the next step;
* at the final step: the run finishes normally (exit 0), there is nothing to resume;
* before training starts or after it ends (start-up, ``test=true``): at once, there is no step to save.

A second signal of the same kind stops at once without a checkpoint (a second Ctrl+C).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch

from setr.errors import Preempted
from setr.utils.distributed import is_ddp_child

log = logging.getLogger("setr")

SIGNALS = ("SIGTERM", "SIGINT", "SIGUSR1")
CHILD_EXIT_WAIT_S = 120  # how long rank 0 waits for its DDP processes to stop on their own before killing them


def _write_stderr(text: str) -> None:
    """Write from a signal handler: ``print`` could re-enter a buffered stream the interrupted code was writing."""
    with contextlib.suppress(OSError):
        os.write(2, text.encode(errors="replace"))


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def _slurm_requeue_signal(trainer: L.Trainer | None) -> int | None:
    """The signal that re-queues the job: Lightning's SLURM environment with ``auto_requeue`` (else None)."""
    if trainer is None:
        return None
    from lightning.fabric.plugins.environments import SLURMEnvironment

    env = trainer._accelerator_connector.cluster_environment
    if isinstance(env, SLURMEnvironment) and env.auto_requeue:
        return int(env.requeue_signal or signal.SIGUSR1)
    return None


def slurm_job_id() -> str | None:
    """The id ``scontrol requeue`` takes: ``<array job>_<task>`` for an array task, else ``SLURM_JOB_ID``."""
    array = os.environ.get("SLURM_ARRAY_JOB_ID")
    job = f"{array}_{os.environ['SLURM_ARRAY_TASK_ID']}" if array and "SLURM_ARRAY_TASK_ID" in os.environ \
        else os.environ.get("SLURM_JOB_ID")
    return job if job and re.fullmatch(r"[0-9_]+", job) else None


def resume_command(output_dir: str | Path | None) -> str | None:
    """``python <script> <this run's overrides> resume=<run dir>``: the command that continues this run (None
    outside Hydra)."""
    try:
        from hydra.core.hydra_config import HydraConfig

        overrides = list(HydraConfig.get().overrides.task)
    except Exception:
        return None
    if output_dir is None:
        return None
    keep = [o for o in overrides if o.split("=", 1)[0].lstrip("+~") not in ("resume", "ckpt_path")]
    script = sys.argv[0] if sys.argv and sys.argv[0] else "src/train.py"
    return " ".join(["python", shlex.quote(script), *map(shlex.quote, keep), shlex.quote(f"resume={output_dir}")])


def watch_parent() -> None:
    """In a DDP process Lightning started (``SETR_DDP_PARENT_PID`` names rank 0): exit when rank 0 is gone.

    A rank 0 killed during start-up left its child waiting in the rendezvous for 30 minutes; a daemon thread
    that checks once a second that its parent is still rank 0 ends the child instead."""
    if not is_ddp_child():
        return
    parent = int(os.environ["SETR_DDP_PARENT_PID"])
    rank = os.environ.get("LOCAL_RANK", "?")

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        _write_stderr(f"[rank {rank}] rank 0 (pid {parent}) has exited; stopping this process\n")
        os._exit(1)

    threading.Thread(target=watch, name="setr-parent-watch", daemon=True).start()


class Preemption(L.Callback):
    """Checkpoint, print the resume command and exit ``128 + signal`` on SIGTERM / SIGINT / SIGUSR1 (re-queue
    under SLURM). Added to every training run by ``src/train.py``; see the module docstring for where it stops.

    ``check_every_n_steps``: how often the ranks compare their records (DDP only; one small CPU all-reduce).
    """

    def __init__(self, check_every_n_steps: int = 1) -> None:
        self.check_every_n_steps = max(1, int(check_every_n_steps))
        self.trainer: L.Trainer | None = None
        self._received: int = 0      # the signal this process received (0: none)
        self._agreed: int = 0        # the signal all ranks agreed to stop on
        self._training = False
        self._pending_after_validation = False
        self._stopping = False
        self._saved: str | None = None
        self._previous: dict[int, Any] = {}
        self._group: Any = None

    # ------------------------------------------------------------------------------------------ handlers
    def install(self) -> None:
        """Handle the signals from now on (called before the trainer is built: start-up is covered too)."""
        if threading.current_thread() is not threading.main_thread():
            return
        for name in SIGNALS:
            signum = int(getattr(signal, name))
            self._previous.setdefault(signum, signal.getsignal(signum))
            signal.signal(signum, self._handle)

    def uninstall(self) -> None:
        """Put the previous handlers back; after a stop, keep ignoring signals until the process has exited (a
        re-queue is followed by SLURM's SIGTERM, which must not cut the stop line or the exit code short)."""
        if threading.current_thread() is not threading.main_thread() or self._stopping:
            return
        for signum, handler in self._previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        self._previous = {}

    def _children(self) -> list[subprocess.Popen]:
        launcher = getattr(getattr(self.trainer, "strategy", None), "launcher", None)
        return list(getattr(launcher, "procs", None) or [])

    def _handle(self, signum: int, frame: Any) -> None:
        """Record the signal (and pass it to the DDP processes this one started): no collective, no buffered I/O."""
        for proc in self._children():
            if proc.poll() is None:
                proc.send_signal(signum)
        name = signal_name(signum)
        if self._stopping:  # already on the way out (SLURM follows a re-queue with SIGTERM): nothing to add
            return
        if not self._training:
            self._stopping = True
            raise Preempted(signum, f"{name} before training started or after it ended: no step to save; run "
                                    "the same command again", agreed=False)
        if self._received == signum:
            if is_ddp_child():  # a terminal's Ctrl+C reaches it twice: directly and passed on by rank 0
                return
            _write_stderr(f"{name} again: stopping now, without a checkpoint of the current step\n")
            self._stopping = True
            raise Preempted(signum, f"a second {name}: the current step is not saved; resume from the last "
                                    "checkpoint with the same command and resume=auto", agreed=False)
        self._received = signum
        if not is_ddp_child():
            _write_stderr(f"{name} received: saving a checkpoint after this step, then stopping "
                          f"(send {name} again to stop at once)\n")

    # ------------------------------------------------------------------------------------------- agreement
    def _agree(self, trainer: L.Trainer) -> int:
        """The signal to stop on, the same on every rank (the largest signal number any rank received)."""
        import torch.distributed as dist

        if trainer.world_size <= 1 or not (dist.is_available() and dist.is_initialized()):
            return self._received
        flag = torch.tensor([self._received], dtype=torch.int64)
        if self._group is None:  # gloo: the default group reduces CPU tensors; NCCL's cannot
            flag = flag.to(trainer.strategy.root_device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._group)
        return int(flag.item())

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        import torch.distributed as dist

        self.trainer = trainer
        self._group = None
        if trainer.world_size > 1 and dist.is_available() and dist.is_initialized() \
                and dist.get_backend() != "gloo":
            try:  # a CPU side group: comparing the records never waits for the GPU
                self._group = dist.new_group(backend="gloo")
            except Exception as e:  # the default group works too, with one GPU sync per check
                log.info("preemption: no gloo group (%s); comparing signal records on %s", e,
                         trainer.strategy.root_device)
        self._training = True

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Replace Lightning's signal handling (see the module docstring) for this trainer."""
        self.trainer = trainer
        connector = getattr(trainer, "_signal_connector", None)
        if connector is not None and hasattr(connector, "register_signal_handlers"):
            connector.register_signal_handlers = lambda: None

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._training = False
        if self._agreed and trainer.is_global_zero:
            log.info("%s received at the final step: the run finished", signal_name(self._agreed))

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._training = False

    # ------------------------------------------------------------------------------------------ safe points
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self._agreed or trainer.global_step % self.check_every_n_steps:
            return
        self._agreed = self._agree(trainer)
        if not self._agreed or _final_step(trainer):
            return
        if _validation_follows(trainer):
            self._pending_after_validation = True  # stop after it (see the module docstring)
            return
        # Lightning logs this step's metrics only after the batch-end hooks; stopping here would leave the step
        # out of the history for good (the resumed run starts after it): log it first, as the loop would
        trainer._logger_connector.on_batch_end()
        trainer._logger_connector.update_train_step_metrics()
        self._save(trainer)
        self._stop(trainer)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or not self._training:
            return
        if not self._agreed:
            self._agreed = self._agree(trainer)
            if not self._agreed:
                return
            self._pending_after_validation = not _final_step(trainer)
        if self._pending_after_validation and not _last_written_after_validation(trainer):
            self._save(trainer)  # no checkpoint callback writes last.ckpt after this validation

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if self._pending_after_validation:
            self._stop(trainer)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._pending_after_validation and not trainer.should_stop:
            self._stop(trainer)

    # ---------------------------------------------------------------------------------------- save and stop
    def _save(self, trainer: L.Trainer) -> None:
        path = _last_path(trainer)
        trainer.save_checkpoint(path)  # every rank: the strategy writes on rank 0 and waits for all
        cb = trainer.checkpoint_callback
        if cb is not None and hasattr(cb, "last_model_path"):
            cb.last_model_path = str(path)
        self._saved = str(path)

    def _stop(self, trainer: L.Trainer) -> None:
        self._pending_after_validation = False
        self._stopping = True
        signum = self._agreed
        name = signal_name(signum)
        path = self._saved or _written_last(trainer)
        step = trainer.global_step
        where = f"{name} at step {step}: checkpoint {path}"
        requeue = _slurm_requeue_signal(trainer)
        if requeue is not None and signum == requeue:
            message = f"{where}; {self._requeue(trainer)}"
        else:
            command = resume_command(trainer.default_root_dir)
            message = f"{where}; resume with: {command}" if command else f"{where}; resume with ckpt_path={path}"
        raise Preempted(signum, message)

    def _requeue(self, trainer: L.Trainer) -> str:
        """``scontrol requeue <job id>`` on rank 0 (as Lightning's SLURM handler does)."""
        job = slurm_job_id()
        if job is None:
            return "no SLURM job id to re-queue: run the job again with resume=auto"
        if not trainer.is_global_zero:
            return f"SLURM job {job} re-queued by rank 0"
        try:
            result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=120)
        except (OSError, subprocess.SubprocessError) as e:
            return f"`scontrol requeue {job}` failed ({e}); resubmit the job with resume=auto"
        if result.returncode != 0:
            why = (result.stderr or result.stdout).strip().splitlines()
            return (f"`scontrol requeue {job}` failed with code {result.returncode}"
                    f"{' (' + why[-1] + ')' if why else ''}; resubmit the job with resume=auto")
        return f"re-queued SLURM job {job}; it continues this run when its command has resume=auto"

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        """Rank 0: leave no DDP process behind. On a stop every rank agreed on, they end on their own (waited
        for); on any other error in this process they may wait in a collective for it, so they are ended."""
        self._training = False
        children = [p for p in self._children() if p.poll() is None]
        if not children:
            return
        if isinstance(exception, Preempted) and exception.agreed:
            deadline = time.monotonic() + CHILD_EXIT_WAIT_S
            for proc in children:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        for proc in children:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def _final_step(trainer: L.Trainer) -> bool:
    """The step after which the run ends anyway (the module then validates and fit returns)."""
    loop = trainer.fit_loop.epoch_loop
    last_step = trainer.max_steps is not None and 0 < trainer.max_steps <= trainer.global_step
    last_epoch = (trainer.max_epochs is not None and trainer.max_epochs > 0
                  and trainer.current_epoch + 1 >= trainer.max_epochs and loop.batch_progress.is_last_batch)
    return bool(last_step or last_epoch or trainer.should_stop)


def _validation_follows(trainer: L.Trainer) -> bool:
    """Whether Lightning validates after this training step (its own decision, read from the loop)."""
    loop = trainer.fit_loop.epoch_loop
    fetcher = getattr(trainer.fit_loop, "_data_fetcher", None)
    if not trainer.enable_validation or fetcher is None:
        return False
    return bool(loop._should_check_val_fx(fetcher))


def _last_written_after_validation(trainer: L.Trainer) -> bool:
    """True when a checkpoint callback of the project writes ``last.ckpt`` at the end of every validation
    (:class:`setr.training.callbacks.Checkpoint` with ``save_last``), after this callback's hook."""
    from setr.training.callbacks import Checkpoint

    return any(isinstance(cb, Checkpoint) and cb.save_last and cb.dirpath for cb in trainer.checkpoint_callbacks)


def _last_path(trainer: L.Trainer) -> Path:
    from lightning.pytorch.callbacks import ModelCheckpoint

    cb = trainer.checkpoint_callback
    if isinstance(cb, ModelCheckpoint) and cb.dirpath:
        return Path(cb.dirpath) / f"{cb.CHECKPOINT_NAME_LAST}{cb.FILE_EXTENSION}"
    return Path(trainer.default_root_dir) / "checkpoints" / "last.ckpt"


def _written_last(trainer: L.Trainer) -> str:
    cb = trainer.checkpoint_callback
    last = getattr(cb, "last_model_path", "") if cb is not None else ""
    return str(last or _last_path(trainer))
