"""Plain progress lines for runs nobody watches live: one line per validation and a heartbeat every N steps.

Lightning's rich progress bar draws nothing when stdout is not a terminal (a log file, SLURM, ``nohup``): such a
run printed nothing between its start and its end. :class:`ProgressLog` writes through the ``setr`` logger, so
each line reaches stdout (Hydra's console handler) and the run's log file (``<run dir>/train.log``, Hydra's file
handler); only rank 0 writes.

* After each validation while fitting: ``val step S/T | mIoU m mAcc a aAcc a | loss l | elapsed e | ETA t``.
  Printed on a terminal too: the bar shows where a run is, not what its validations scored.
* Every ``every_n_steps`` optimizer steps: ``step S/T | loss l | lr x | n img/s | elapsed e | ETA t`` (the loss is
  the mean over the steps since the previous line). With ``heartbeat: auto`` only when no live bar is drawn
  (stdout not a terminal, or no progress bar): on a terminal the bar already shows the same numbers.

While the rich bar is live on a terminal a line written straight to stdout would be overwritten by the bar's next
redraw; there the line goes through the bar's console (printed above the bar) and to the log file's handlers.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

import lightning as L
import torch

from setr.errors import SETRConfigError

log = logging.getLogger("setr")

HEARTBEAT_MODES = ("auto", "always", "never")


def format_duration(seconds: float) -> str:
    """``42s``, ``3m05s``, ``2h07m``, ``1d03h``: short, fixed-format, readable in a log file."""
    if not math.isfinite(seconds):
        return "?"
    s = round(max(seconds, 0.0))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def _batch_size(batch: Any) -> int:
    """Images in a training batch (the project's batches are dicts with an ``image`` tensor)."""
    images = batch.get("image") if isinstance(batch, dict) else batch[0] if isinstance(batch, (list, tuple)) else batch
    if isinstance(images, torch.Tensor):
        return int(images.shape[0])
    return len(images) if hasattr(images, "__len__") else 0


class ProgressLog(L.Callback):
    """One line per validation and a heartbeat every ``every_n_steps`` optimizer steps, through the ``setr``
    logger (stdout and ``<run dir>/<task>.log``); rank 0 only.

    Args:
        every_n_steps: heartbeat interval in optimizer steps; ``0`` or ``None``: no heartbeat. 50 by default, as
            mmsegmentation's text log (its ``log_config.interval``).
        heartbeat: ``auto`` (only when no live progress bar is drawn), ``always`` or ``never``.
        validation: the per-validation line (``false``: none).

    ``elapsed`` counts from the start of this process's fit (a resumed run starts again at 0) and ``ETA`` is the
    steps left at this fit's mean pace so far, validations included; the total is ``trainer.max_steps`` (or the
    steps of ``max_epochs``). ``img/s`` counts the images of every process (rank 0's times the world size).
    """

    def __init__(self, every_n_steps: int | None = 50, heartbeat: str = "auto", validation: bool = True) -> None:
        if every_n_steps is not None and (isinstance(every_n_steps, bool) or not isinstance(every_n_steps, int)
                                          or every_n_steps < 0):
            raise SETRConfigError(f"every_n_steps: expected an int >= 0 or null, got {every_n_steps!r}")
        if heartbeat not in HEARTBEAT_MODES:
            raise SETRConfigError(f"heartbeat: expected one of {', '.join(HEARTBEAT_MODES)}, got {heartbeat!r}")
        self.every_n_steps = every_n_steps or 0
        self.heartbeat = heartbeat
        self.validation = bool(validation)
        self._reset()

    def _reset(self) -> None:
        self._start = self._mark = time.monotonic()
        self._start_step = self._mark_step = 0
        self._images = 0
        self._loss_sum: torch.Tensor | float = 0.0
        self._loss_count = 0
        self._bar_live = False
        self._beat = False

    # ------------------------------------------------------------------------------------------- output
    @staticmethod
    def _bar_is_live(trainer: L.Trainer) -> bool:
        """Whether a progress bar draws live: an enabled bar, and for the rich bar a terminal to draw on (off a
        terminal it draws nothing until its end)."""
        from lightning.pytorch.callbacks import RichProgressBar

        bar = trainer.progress_bar_callback
        if bar is None or not bar.is_enabled:
            return False
        if not isinstance(bar, RichProgressBar):
            return True  # tqdm draws on stderr, whatever it is
        from rich.console import Console

        return Console(**getattr(bar, "_console_kwargs", {})).is_terminal

    def _emit(self, trainer: L.Trainer, message: str) -> None:
        """``message`` to stdout and the log file: through the ``setr`` logger; while the rich bar is live on a
        terminal, printed above the bar through its console and handed to the logger's file handlers only."""
        from lightning.pytorch.callbacks import RichProgressBar

        bar = trainer.progress_bar_callback
        console = getattr(bar, "_console", None) if isinstance(bar, RichProgressBar) and self._bar_live else None
        if console is None:
            log.info(message)
            return
        console.print(message, markup=False, highlight=False)
        record = log.makeRecord(log.name, logging.INFO, __file__, 0, message, None, None)
        for handler in _file_handlers(log):
            if record.levelno >= handler.level:
                handler.handle(record)

    # ------------------------------------------------------------------------------------------- hooks
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._reset()
        self._start_step = self._mark_step = trainer.global_step  # a resumed run: rates and ETA from here
        self._bar_live = self._bar_is_live(trainer)
        self._beat = self.every_n_steps > 0 and (
            self.heartbeat == "always" or (self.heartbeat == "auto" and not self._bar_live))

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if not self._beat or not trainer.is_global_zero:
            return
        self._images += _batch_size(batch)
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if isinstance(loss, torch.Tensor):  # summed on its device: no host sync on the steps between lines
            self._loss_sum = self._loss_sum + loss.detach().float() * trainer.accumulate_grad_batches
            self._loss_count += 1
        step = trainer.global_step
        if step == self._mark_step or step % self.every_n_steps:
            return
        now = time.monotonic()
        rate = self._images * trainer.world_size / max(now - self._mark, 1e-9)
        parts = [self._step_text(trainer)]
        if self._loss_count:
            parts.append(f"loss {float(self._loss_sum) / self._loss_count:.4f}")
        if trainer.optimizers:
            parts.append(f"lr {trainer.optimizers[0].param_groups[0]['lr']:.3e}")
        parts += [f"{rate:.1f} img/s", *self._times(trainer, now)]
        self._emit(trainer, " | ".join(parts))
        self._mark, self._mark_step, self._images = now, step, 0
        self._loss_sum, self._loss_count = 0.0, 0

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.validation or trainer.sanity_checking or trainer.state.fn != "fit" or not trainer.is_global_zero:
            return
        metrics = trainer.callback_metrics
        scores = " ".join(f"{k} {float(metrics[f'val/{k}']):.4f}" for k in ("mIoU", "mAcc", "aAcc")
                          if f"val/{k}" in metrics)
        parts = ["val " + self._step_text(trainer), scores or "no val scores"]
        if "train/loss" in metrics:
            parts.append(f"train loss {float(metrics['train/loss']):.4f}")
        parts += self._times(trainer, time.monotonic())
        self._emit(trainer, " | ".join(parts))

    # ------------------------------------------------------------------------------------------- text
    @staticmethod
    def _total(trainer: L.Trainer) -> float:
        try:
            return float(trainer.estimated_stepping_batches)  # max_steps, or the steps of max_epochs
        except Exception:  # a loader without a length
            return float("inf")

    def _step_text(self, trainer: L.Trainer) -> str:
        total = self._total(trainer)
        return f"step {trainer.global_step}/{int(total)}" if math.isfinite(total) else f"step {trainer.global_step}"

    def _times(self, trainer: L.Trainer, now: float) -> list[str]:
        """``elapsed`` since this fit started and ``ETA`` at this fit's mean pace (validations included)."""
        elapsed = now - self._start
        done = trainer.global_step - self._start_step
        left = self._total(trainer) - trainer.global_step
        eta = elapsed / done * left if done > 0 and math.isfinite(left) else float("nan")
        return [f"elapsed {format_duration(elapsed)}", f"ETA {format_duration(eta)}"]


def _file_handlers(logger: logging.Logger) -> list[logging.Handler]:
    """The file handlers a record of ``logger`` reaches (its own and its ancestors' while propagating)."""
    out: list[logging.Handler] = []
    node: logging.Logger | None = logger
    while node is not None:
        out += [h for h in node.handlers if isinstance(h, logging.FileHandler)]
        node = node.parent if node.propagate else None
    return out
