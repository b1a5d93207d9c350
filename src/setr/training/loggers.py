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

W&B helpers: :func:`log_wandb_confusion_chart` (the confusion matrix as W&B's interactive chart) and
:func:`wandb_run_line` (the ``wandb sync`` command of an offline run, or the URL of an online one, that
:func:`setr.tasks.train.train` prints at the end of the run).
"""

from __future__ import annotations

import csv
import io
import logging
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.fabric.utilities.cloud_io import _is_local_file_protocol
from lightning.pytorch.loggers import CSVLogger as _CSVLogger
from lightning.pytorch.loggers import TensorBoardLogger as _TensorBoardLogger
from lightning.pytorch.loggers import WandbLogger as _WandbLogger
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


class WandbLogger(_WandbLogger):
    """Lightning's ``WandbLogger`` without the ``anonymous=None`` it always passes to ``wandb.init``: wandb 0.31
    prints a warning for that setting ("has no effect") on every run. An ``anonymous`` given is passed on."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self._wandb_init.get("anonymous") is None:
            self._wandb_init.pop("anonymous", None)


def continue_loggers(trainer: L.Trainer, step: int) -> None:
    """A fit resumes from a checkpoint at global step ``step``: each logger that can continues its history there."""
    for lg in trainer.loggers:
        if hasattr(lg, "continue_from"):
            lg.continue_from(step)


def confusion_chart_rows(confmat: Any, class_names: Sequence[str], max_rows: int) -> list[list[Any]]:
    """The ``[Actual, Predicted, nPredictions]`` rows of W&B's confusion-matrix chart for an aggregated matrix
    (rows: label, columns: prediction, pixel counts), in row-major order: every cell, as
    ``wandb.plot.confusion_matrix`` writes them; when that is more than ``max_rows`` (W&B truncates a logged table
    to ``wandb.Table.MAX_ROWS``: ADE20K's 150 classes make 22,500 cells), the non-zero cells, and of those, if
    still too many, the ``max_rows`` largest counts (the chart leaves the others blank)."""
    if hasattr(confmat, "detach"):  # a torch tensor, maybe on the GPU
        confmat = confmat.detach().cpu()
    cm = np.asarray(confmat, dtype=np.int64)
    n = len(class_names)
    if cm.shape != (n, n):
        raise ValueError(f"a {cm.shape} confusion matrix for {n} class names")
    cells = [(i, j) for i in range(n) for j in range(n)]
    if len(cells) > max_rows:
        cells = [(i, j) for i, j in cells if cm[i, j]]
        if len(cells) > max_rows:
            keep = set(sorted(cells, key=lambda c: -cm[c])[:max_rows])
            log.info("wandb: the confusion chart shows the %d largest of its %d non-zero cells", max_rows, len(cells))
            cells = [c for c in cells if c in keep]
    return [[class_names[i], class_names[j], int(cm[i, j])] for i, j in cells]


def wandb_confusion_chart(confmat: Any, class_names: Sequence[str], title: str) -> Any:
    """W&B's interactive confusion-matrix chart (the ``wandb/confusion_matrix/v1`` preset that
    ``wandb.plot.confusion_matrix`` uses) of an already aggregated matrix: ``wandb.plot.confusion_matrix`` wants one
    label and one prediction per sample, which for segmentation would be every pixel of the split."""
    import wandb

    columns = ["Actual", "Predicted", "nPredictions"]
    table = wandb.Table(columns=columns, data=confusion_chart_rows(confmat, class_names, wandb.Table.MAX_ROWS))
    return wandb.plot_table("wandb/confusion_matrix/v1", table, {c: c for c in columns}, {"title": title})


def log_wandb_confusion_chart(loggers: Sequence[Any], confmat: Any, class_names: Sequence[str], prefix: str = "val",
                              step: int | None = None) -> int:
    """Log ``<prefix>/confusion_matrix``, the interactive chart of ``confmat``, to every W&B logger in ``loggers``;
    returns how many."""
    targets = [lg for lg in loggers if isinstance(lg, _WandbLogger)]
    if not targets:
        return 0
    title = f"{prefix} confusion matrix (pixels" + (f", step {step})" if step is not None else ")")
    payload: dict[str, Any] = {f"{prefix}/confusion_matrix": wandb_confusion_chart(confmat, class_names, title)}
    if step is not None:
        payload["trainer/global_step"] = step
    for lg in targets:
        lg.experiment.log(payload)
    return len(targets)


def wandb_run_line(run: Any = None) -> str | None:
    """Where the W&B run ``run`` (default: this process's active run) went, in one line: for an offline run, the
    command that uploads it, ``wandb sync`` with its offline folder (``<run dir>/wandb/offline-run-<time>-<id>``),
    preceded by the earlier folders of the same run id a resumed run left there (``wandb sync`` uploads them in
    order and skips those already uploaded); for an online run, its URL. ``None`` without a W&B run, or with
    ``WANDB_MODE=disabled``."""
    if run is None:
        wandb = sys.modules.get("wandb")  # not imported: no W&B run in this process
        run = getattr(wandb, "run", None) if wandb is not None else None
    if run is None:
        return None
    mode = str(getattr(run.settings, "mode", "") or "")
    if mode in ("offline", "dryrun") or getattr(run, "offline", False):
        here = Path(run.settings.sync_dir)
        if not here.is_dir():
            return None
        folders = sorted(p for p in here.parent.glob(f"offline-run-*-{run.id}") if p.is_dir() and p != here)
        paths = " ".join(shlex.quote(str(p)) for p in [*folders, here])
        return f"wandb: offline run saved; upload it with: wandb sync {paths}"
    url = getattr(run, "url", None)
    return f"wandb: run at {url}" if url else None


def log_wandb_run_line() -> None:
    """Log :func:`wandb_run_line` of this process's W&B run, if it has one (at the end of a run, ended or stopped)."""
    try:
        line = wandb_run_line()
    except Exception as e:  # a hint: it never replaces the error a stopped run is reporting
        log.debug("wandb: no sync line (%s: %s)", type(e).__name__, e)
        return
    if line:
        log.info("%s", line)
