"""Callbacks: the one owner of metric reports, checkpoints, W&B segmentation samples, a step-budget progress bar."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import ModelCheckpoint, RichProgressBar

from setr import report
from setr.visualize import denormalize

log = logging.getLogger("setr")


def _wandb_loggers(trainer: L.Trainer) -> list[Any]:
    from lightning.pytorch.loggers import WandbLogger

    return [lg for lg in trainer.loggers if isinstance(lg, WandbLogger)]


class MetricReport(L.Callback):
    """The one owner of metric reports: the per-class console table, ``<split>_scores.csv/json``,
    ``<split>_confusion.csv/png`` in ``output_dir``, and the per-class table and confusion image in W&B.

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
        report.log_to_wandb(_wandb_loggers(trainer), scores, names, prefix=split, step=trainer.global_step,
                            confusion_png=paths["confusion_png"])
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
    """Lightning's ``ModelCheckpoint``, with ``last.ckpt`` written after every validation.

    Lightning 2.6 writes ``last.ckpt`` only when a top-k checkpoint was saved at the same step, so a validation
    that did not improve the monitored score left ``last.ckpt`` at an older step: a run killed later resumed
    from there and lost those steps, and the final ``last.ckpt`` need not hold the final weights."""

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
