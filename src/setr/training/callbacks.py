"""Callbacks that need Lightning: W&B segmentation samples and per-class tables, a step-budget progress bar."""

from __future__ import annotations

from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import RichProgressBar

from setr.report import wandb_table


def _wandb_loggers(trainer: L.Trainer) -> list[Any]:
    from lightning.pytorch.loggers import WandbLogger

    return [lg for lg in trainer.loggers if isinstance(lg, WandbLogger)]


class WandbSegmentationLogger(L.Callback):
    """On rank 0, after each validation: ``num_samples`` fixed validation images with predicted and ground-truth
    masks (``wandb.Image(..., masks=...)`` with class labels) and a per-class IoU table. No-op without W&B."""

    def __init__(self, num_samples: int = 4) -> None:
        self.num_samples = num_samples

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # after the module's on_validation_epoch_end, so the scores are this validation's
        loggers = _wandb_loggers(trainer)
        if not loggers or trainer.sanity_checking or not trainer.is_global_zero:
            return
        import wandb

        hp = pl_module.hparams
        labels = {i: n for i, n in enumerate(hp.class_names)}
        labels[hp.ignore_index] = "ignore"
        ds = trainer.datamodule.datasets.get("val") if trainer.datamodule is not None else None
        images = []
        if ds is not None:
            mean = torch.tensor(hp.mean).view(3, 1, 1)
            std = torch.tensor(hp.std).view(3, 1, 1)
            was_training = pl_module.training
            pl_module.eval()
            for i in range(min(self.num_samples, len(ds))):
                sample = ds[i]
                img = sample["image"].to(pl_module.device)
                mask = sample["mask"]
                with torch.no_grad():
                    logits = pl_module.predict_logits(img[None], [tuple(mask.shape)])[0]
                pred = logits.argmax(0).cpu().numpy().astype(np.uint8)
                if img.shape[-2:] != mask.shape:
                    img = torch.nn.functional.interpolate(img[None], size=tuple(mask.shape), mode="bilinear")[0]
                rgb = (img.cpu() * std + mean).clamp(0, 255).byte().permute(1, 2, 0).numpy()
                images.append(wandb.Image(rgb, masks={
                    "predictions": {"mask_data": pred, "class_labels": labels},
                    "ground_truth": {"mask_data": mask.numpy().astype(np.uint8), "class_labels": labels},
                }, caption=f"val sample {i}"))
            pl_module.train(was_training)
        scores = pl_module.last_scores.get("val", {}).get("scores")
        table = wandb_table(scores, hp.class_names) if scores is not None else None
        for lg in loggers:
            payload = {"trainer/global_step": trainer.global_step}
            if images:
                payload["val/samples"] = images
            if table is not None:
                payload["val/per_class"] = table
            lg.experiment.log(payload)


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
