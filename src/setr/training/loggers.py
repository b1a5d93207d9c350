"""Loggers whose history survives a resume: a resumed run continues the run folder's history, it never replaces it.

Lightning's loggers start every ``fit`` afresh: ``CSVLogger`` deletes the ``metrics.csv`` it finds (with a warning),
and ``TensorBoardLogger`` adds an events file beside the old ones, so the steps between the checkpoint and the kill
appear twice. Here, when a run resumes from a checkpoint taken at global step ``G``
(:meth:`setr.training.SETRModule.on_load_checkpoint` calls :func:`continue_loggers`):

* :class:`CSVLogger` keeps the rows of ``metrics.csv`` logged at steps ``< G`` (everything logged before the
  checkpoint: Lightning logs the training step that makes global step ``G`` and the validation after it at step
  ``G - 1``) and drops the rows of the steps the resumed run trains again (and a row half-written by a kill); new
  rows are appended, and the file's columns are the union of the old and new ones.
* :class:`TensorBoardLogger` opens its next events file with ``purge_step=G``: TensorBoard then discards the
  scalars of step ``>= G`` in the older files, so each step shows once.
* W&B continues the same run id (:func:`setr.tasks.train.setup_wandb`); a W&B run cannot be rewound offline, so the
  steps the killed run logged after its checkpoint stay in its history beside the resumed run's values of those
  steps (``trainer/global_step`` is the x axis: the resumed values are the later points of each step).

Lightning writes the loggers' files after every value it logs, so a run killed with SIGKILL has on disk every value
logged before its last checkpoint. When ``metrics.csv`` is rewritten (a new column appears, a run resumes) the new
file replaces the old one atomically: Lightning truncated it first, so a kill during the rewrite lost the history.
"""

from __future__ import annotations

import csv
import io
import logging
from typing import Any

import lightning as L
from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.fabric.utilities.cloud_io import _is_local_file_protocol
from lightning.pytorch.loggers import CSVLogger as _CSVLogger
from lightning.pytorch.loggers import TensorBoardLogger as _TensorBoardLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.utilities.rank_zero import rank_zero_only

log = logging.getLogger("setr")


def _step_of(row: dict[str, Any]) -> int | None:
    try:
        return int(float(row.get("step") or ""))
    except ValueError:
        return None


class _ContinuingWriter(ExperimentWriter):
    """Lightning's CSV writer that leaves an existing ``metrics.csv`` alone until it knows whether the run resumes:
    :meth:`continue_from` (a resume) keeps its rows before the checkpoint's step; a first write without it (a new
    run in a folder with an old file) replaces the file, as Lightning does."""

    def __init__(self, log_dir: str) -> None:
        self._old_file: bool | None = None
        super().__init__(log_dir)

    def _check_log_dir_exists(self) -> None:
        # Lightning deletes metrics.csv here; the decision waits for continue_from() or the first save()
        self._old_file = self._fs.isfile(self.metrics_file_path)

    def _write_rows(self, fieldnames: list[str], rows: list[dict[str, Any]]) -> None:
        """Replace ``metrics.csv`` with ``rows``: atomically on a local disk (a kill keeps the old file whole)."""
        buf = io.StringIO(newline="")
        writer = csv.DictWriter(buf, fieldnames=fieldnames)
        writer.writeheader()
        writer.writerows(rows)
        if _is_local_file_protocol(self.metrics_file_path):
            from setr.utils.output import write_text

            write_text(self.metrics_file_path, buf.getvalue())
        else:
            with self._fs.open(self.metrics_file_path, "w", newline="") as f:
                f.write(buf.getvalue())

    def _rewrite_with_new_header(self, fieldnames: list[str]) -> None:
        with self._fs.open(self.metrics_file_path, "r", newline="") as f:
            rows = list(csv.DictReader(f))
        self._write_rows(fieldnames, rows)

    def continue_from(self, step: int) -> int:
        """Keep the rows logged before global step ``step`` (and their columns), drop the others; returns how
        many rows were dropped."""
        self._old_file = False
        self.metrics = [m for m in self.metrics if m.get("step", 0) < step]
        if not self._fs.isfile(self.metrics_file_path):
            return 0
        with self._fs.open(self.metrics_file_path, "r", newline="") as f:
            reader = csv.reader(f)
            header = next(reader, None) or []
            lines = list(reader)
        if not header:  # an empty file (a kill as it was created): no history to keep
            self._fs.rm_file(self.metrics_file_path)
            return 0
        kept, dropped = [], 0
        for values in lines:
            row = dict(zip(header, values))
            row_step = _step_of(row)
            # a row with another number of fields, or no step, is a line a kill cut short
            if len(values) != len(header) or row_step is None or row_step >= step:
                dropped += 1
                continue
            kept.append(row)
        self.metrics_keys = sorted(set(self.metrics_keys) | set(header))
        self._write_rows(self.metrics_keys, kept)
        return dropped

    def save(self) -> None:
        if self._old_file and self.metrics:  # a new run in a folder with another run's history: Lightning's way
            self._old_file = False
            if self._fs.isfile(self.metrics_file_path):
                self._fs.rm_file(self.metrics_file_path)
        super().save()


class CSVLogger(_CSVLogger):
    """Lightning's ``CSVLogger`` with a history that a resumed run continues (see the module docstring)."""

    @property
    @rank_zero_experiment
    def experiment(self) -> _ContinuingWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _ContinuingWriter(log_dir=self.log_dir)
        return self._experiment

    @rank_zero_only
    def continue_from(self, step: int) -> None:
        writer = self.experiment
        dropped = writer.continue_from(step)
        log.info("csv: continuing %s from step %d%s", writer.metrics_file_path, step,
                 f" (dropped {dropped} rows of steps this run trains again)" if dropped else "")


class TensorBoardLogger(_TensorBoardLogger):
    """Lightning's ``TensorBoardLogger``: a resumed run's events file starts with ``purge_step`` at the checkpoint's
    step, so TensorBoard shows each step once (see the module docstring)."""

    @rank_zero_only
    def continue_from(self, step: int) -> None:
        if self._experiment is not None:
            self._experiment.close()
            self._experiment = None
        self._kwargs["purge_step"] = step
        self.experiment  # noqa: B018  (opens the new events file, whose first events purge steps >= `step`)
        self._kwargs.pop("purge_step")


def continue_loggers(trainer: L.Trainer, step: int) -> None:
    """A fit resumes from a checkpoint at global step ``step``: each logger that can continues its history there."""
    for lg in trainer.loggers:
        if hasattr(lg, "continue_from"):
            lg.continue_from(step)
