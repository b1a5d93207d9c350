"""Callbacks: the one owner of metric reports, checkpoints, W&B segmentation samples, a step-budget progress bar."""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.fabric.utilities.cloud_io import _is_local_file_protocol
from lightning.pytorch.callbacks import ModelCheckpoint, RichProgressBar

from setr import report
from setr.training.loggers import log_wandb_confusion_chart
from setr.visualize import denormalize

log = logging.getLogger("setr")


def _wandb_loggers(trainer: L.Trainer) -> list[Any]:
    from lightning.pytorch.loggers import WandbLogger

    return [lg for lg in trainer.loggers if isinstance(lg, WandbLogger)]


class MetricReport(L.Callback):
    """The one owner of metric reports: the per-class console table, ``<split>_scores.csv/json``,
    ``<split>_confusion.csv/png`` in ``output_dir``, and in W&B the per-class table, the confusion image and
    ``<split>/confusion_matrix``, W&B's interactive chart of the same matrix.

    The numbers are those of the module's metric object for the split (:meth:`SETRModule.metrics_for`), read
    after the evaluation ends: its ``compute()`` is the result all-reduced over processes, so under DDP the
    saved confusion matrix counts every process's pixels. Every process reads it (no collective is left
    waiting); only rank 0 writes and logs.

    While fitting, each validation logs its per-class table to W&B; the files, the console table and the
    confusion image are written once, for the final validation, when fitting ends. ``trainer.validate`` and
    ``trainer.test`` report at their end.
    """

    def __init__(self, output_dir: str | Path | None = None) -> None:
        self.output_dir = output_dir

    def _scores(self, pl_module: L.LightningModule, split: str) -> dict[str, torch.Tensor] | None:
        metrics = pl_module.metrics_for(split)
        if not metrics.update_called:
            return None
        return metrics.compute()

    def _report(self, trainer: L.Trainer, pl_module: L.LightningModule, split: str) -> None:
        scores = self._scores(pl_module, split)
        if scores is None or not trainer.is_global_zero:
            return
        names = pl_module.record.class_names
        out = Path(self.output_dir or trainer.default_root_dir)
        report.print_table(scores, names, title=f"{split} scores (step {trainer.global_step})")
        paths = report.save_report(scores, names, out, scores["confmat"], prefix=split)
        wandb_loggers = _wandb_loggers(trainer)
        report.log_to_wandb(wandb_loggers, scores, names, prefix=split, step=trainer.global_step,
                            confusion_png=paths["confusion_png"])
        log_wandb_confusion_chart(wandb_loggers, scores["confmat"], names, prefix=split, step=trainer.global_step)
        log.info("%s report: %s", split, ", ".join(str(p) for p in paths.values()))

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        if not trainer.training and trainer.state.fn == "validate":
            self._report(trainer, pl_module, "val")
            return
        loggers = _wandb_loggers(trainer)
        scores = self._scores(pl_module, "val") if loggers else None
        if scores is not None and trainer.is_global_zero:
            report.log_to_wandb(loggers, scores, pl_module.record.class_names, prefix="val", step=trainer.global_step)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._report(trainer, pl_module, "val")

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._report(trainer, pl_module, "test")


class Checkpoint(ModelCheckpoint):
    """Lightning's ``ModelCheckpoint``, with ``last.ckpt`` written after every validation, and a checkpoint folder
    that stays what ``save_top_k`` says across resumes.

    * Lightning 2.6 writes ``last.ckpt`` only when a top-k checkpoint was saved at the same step, so a validation
      that did not improve the monitored score left ``last.ckpt`` at an older step: a run killed later resumed
      from there and lost those steps, and the final ``last.ckpt`` need not hold the final weights.
    * Lightning restores the top-k bookkeeping (``best_k_models``) only when the folder path stored in the
      checkpoint is the same string as this run's: a run folder reached through another path (a symlinked
      ``logs/``, ``resume=auto`` resolving it, a moved folder) lost it, and every resume then kept one more
      ``step_*`` file. Here the folder is the same when it is the same directory on disk, or when the run resumes
      from a checkpoint inside it; the stored paths are mapped into it.
    * A run killed between two writes (after a new best ``step_*`` file and before ``last.ckpt``, or before the
      old best was deleted) left files its checkpoint does not know, which were never deleted. On resume, the
      top-k files of this folder that the restored state does not hold are deleted (the resumed run writes the
      same steps again), and the file the run resumed from is deleted like any other when it leaves the top k
      (Lightning keeps it forever).
    * A file of the same name is overwritten, never kept beside a ``-v1`` copy (``enable_version_counter=False``
      by default): a run folder holds one run (``conf/hydra/default.yaml``), so a ``last.ckpt`` or ``step_*`` file
      already there is this run's own older state (a damaged ``last.ckpt`` the run fell back from, a step being
      written again after a resume), and each write replaces it atomically (:mod:`setr.training.checkpoint_io`).
    * Partial files of a killed writer are deleted when training starts.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("enable_version_counter", False)
        super().__init__(*args, **kwargs)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        self._trainer = trainer
        if trainer.is_global_zero and stage == "fit" and self.dirpath and _is_local_file_protocol(self.dirpath):
            from setr.utils.output import clean_partials

            for p in clean_partials(self.dirpath):
                log.info("checkpoints: deleted %s, the partial file of a write that was killed", p)

    def _same_folder(self, stored: str | None) -> bool:
        if not stored or not self.dirpath or not _is_local_file_protocol(self.dirpath):
            return stored == self.dirpath
        here = Path(self.dirpath)
        if os.path.realpath(stored) == os.path.realpath(here):
            return True
        trainer = getattr(self, "_trainer", None)
        resumed = getattr(trainer, "ckpt_path", None)
        return bool(resumed) and os.path.realpath(Path(resumed).parent) == os.path.realpath(here)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        stored = state_dict.get("dirpath", self.dirpath)
        if stored != self.dirpath and self._same_folder(stored):
            here = str(self.dirpath)

            def moved(p: Any) -> Any:
                return os.path.join(here, os.path.basename(p)) if isinstance(p, str) and p else p

            state_dict = {**state_dict, "dirpath": self.dirpath,
                          "best_k_models": {moved(k): v for k, v in (state_dict.get("best_k_models") or {}).items()},
                          **{k: moved(state_dict.get(k)) for k in ("best_model_path", "kth_best_model_path",
                                                                    "last_model_path") if k in state_dict}}
        super().load_state_dict(state_dict)

    def _top_k_file(self, name: str) -> bool:
        """Whether ``name`` is a file this callback's ``filename`` template writes (``-vN`` copies included)."""
        parts = re.split(r"\{[^}]*\}", self.filename or "")
        if not "".join(parts) or name.startswith(self.CHECKPOINT_NAME_LAST or "last"):
            return False  # a template of placeholders only would match any file: none is taken for top-k
        pattern = ".+?".join(re.escape(p) for p in parts)
        return re.fullmatch(f"{pattern}(-v\\d+)?{re.escape(self.FILE_EXTENSION)}", name) is not None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        if not (trainer.ckpt_path and trainer.is_global_zero and self.dirpath and self.save_top_k > 0
                and _is_local_file_protocol(self.dirpath) and os.path.isdir(self.dirpath)):
            return
        keep = {os.path.realpath(p) for p in [*self.best_k_models, self.best_model_path, self.last_model_path,
                                              trainer.ckpt_path] if p}
        for entry in sorted(os.scandir(self.dirpath), key=lambda e: e.name):
            if entry.is_file() and self._top_k_file(entry.name) and os.path.realpath(entry.path) not in keep:
                os.unlink(entry.path)
                log.info("checkpoints: deleted %s, written after the step this run resumes from or left over by a "
                         "kill (save_top_k=%d)", entry.path, self.save_top_k)

    def _should_remove_checkpoint(self, trainer: L.Trainer, previous: str, current: str) -> bool:
        if super()._should_remove_checkpoint(trainer, previous, current):
            return True
        resumed = trainer.ckpt_path
        return bool(previous != current and resumed and _is_local_file_protocol(previous) and self.dirpath
                    and os.path.realpath(previous) == os.path.realpath(resumed)
                    and os.path.realpath(Path(previous).parent) == os.path.realpath(self.dirpath)
                    and self._top_k_file(Path(previous).name))

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        if self.save_last and not self._should_skip_saving_checkpoint(trainer) \
                and not self._should_save_on_train_epoch_end(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))


class WandbSegmentationLogger(L.Callback):
    """On rank 0, after each validation while fitting: ``num_samples`` fixed validation images with predicted and
    ground-truth masks (``wandb.Image(..., masks=...)`` with the record's class labels). No-op without W&B."""

    def __init__(self, num_samples: int = 4) -> None:
        self.num_samples = num_samples

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        loggers = _wandb_loggers(trainer)
        if not loggers or trainer.sanity_checking or not trainer.is_global_zero:
            return
        ds = trainer.datamodule.datasets.get("val") if trainer.datamodule is not None else None
        if ds is None:
            return
        import wandb

        record = pl_module.record
        labels = dict(enumerate(record.class_names))
        labels[record.ignore_index] = "ignore"
        images = []
        was_training = pl_module.training
        pl_module.eval()
        for i in range(min(self.num_samples, len(ds))):
            sample = ds[i]
            img, mask = sample["image"], sample["mask"]
            with torch.no_grad():
                logits = pl_module.predict_logits(img[None].to(pl_module.device), [tuple(mask.shape)])[0]
            pred = logits.argmax(0).cpu().numpy().astype(np.uint8)
            if img.shape[-2:] != mask.shape:
                img = torch.nn.functional.interpolate(img[None], size=tuple(mask.shape), mode="bilinear")[0]
            images.append(wandb.Image(denormalize(img, record.mean, record.std), masks={
                "predictions": {"mask_data": pred, "class_labels": labels},
                "ground_truth": {"mask_data": mask.numpy().astype(np.uint8), "class_labels": labels},
            }, caption=f"val sample {i}"))
        pl_module.train(was_training)
        for lg in loggers:
            lg.experiment.log({"trainer/global_step": trainer.global_step, "val/samples": images})


class StepProgressBar(RichProgressBar):
    """Lightning's rich progress bar, labelled for step budgets: with ``max_epochs=-1`` the stock label reads
    ``Epoch 4/-2``; this one reads ``Epoch 4 (of 300 steps)``."""

    def _get_train_description(self, current_epoch: int) -> str:
        trainer = self.trainer
        max_epochs = trainer.max_epochs
        if max_epochs is not None and max_epochs >= 0:
            return super()._get_train_description(current_epoch)
        text = f"Epoch {current_epoch}"
        if trainer.max_steps and trainer.max_steps > 0:
            text += f" (of {trainer.max_steps} steps)"
        return f"{text:{len(self.validation_description)}}"
