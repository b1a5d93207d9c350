"""The Lightning module: wires the SETR network, its losses, optimizer, schedule and metrics together.

It takes plain hyperparameters (the ``model`` config mapping, ``optimizer`` mapping, dataset facts) and builds the
network itself, so ``SETRModule.load_from_checkpoint(path)`` needs no extra arguments.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torchmetrics import MaxMetric

from setr.data.base import IGNORE_INDEX
from setr.errors import SETRConfigError
from setr.inference import infer
from setr.metrics import SegMetrics
from setr.models import SETR, build_setr
from setr.training.optim import build_optimizer, build_scheduler


def _plain(obj: Any) -> Any:
    """OmegaConf containers -> plain python (checkpoints then load without OmegaConf)."""
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf

        if isinstance(obj, (DictConfig, ListConfig)):
            return OmegaConf.to_container(obj, resolve=True)
    except ImportError:  # pragma: no cover
        pass
    return obj


def strip_compile_prefix(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """Drop ``_orig_mod.`` (left by ``torch.compile``) from state-dict keys."""
    return {k.replace("_orig_mod.", ""): v for k, v in state_dict.items()}


class SETRModule(L.LightningModule):
    """SETR training / evaluation.

    Args:
        model: the ``model`` config node (see :func:`setr.models.build_setr`). ``encoder.pretrained`` is loaded
            once at the start of fitting, never when a checkpoint is loaded.
        optimizer: the ``optimizer`` node (``name``, ``lr``, ``head_lr_mult``, ``scheduler``, ...).
        num_classes, class_names, palette, ignore_index, mean, std, crop_size: dataset facts, kept with the
            weights so evaluation and prediction need nothing else.
        inference: the ``data.inference`` node used by validation and test (``mode: whole|slide``, ...).
        compile: run the network through ``torch.compile`` (checkpoints stay free of ``_orig_mod.``).
        log_per_class: log per-class IoU as ``val/IoU/<class>``.
    """

    def __init__(
        self,
        model: Mapping,
        optimizer: Mapping,
        num_classes: int,
        class_names: Sequence[str] | None = None,
        palette: Sequence[Sequence[int]] | None = None,
        ignore_index: int = IGNORE_INDEX,
        mean: Sequence[float] = (123.675, 116.28, 103.53),
        std: Sequence[float] = (58.395, 57.12, 57.375),
        crop_size: int | Sequence[int] = 512,
        inference: Mapping | None = None,
        compile: bool = False,
        log_per_class: bool = True,
    ) -> None:
        super().__init__()
        model, optimizer, inference = _plain(model), _plain(optimizer), _plain(inference)
        class_names, palette = _plain(class_names), _plain(palette)
        if class_names is None:
            class_names = [f"class_{i}" for i in range(num_classes)]
        if len(class_names) != num_classes:
            raise SETRConfigError(f"data.class_names: {len(class_names)} names for {num_classes} classes")
        self.save_hyperparameters({
            "model": model, "optimizer": optimizer, "num_classes": num_classes, "class_names": list(class_names),
            "palette": [list(c) for c in palette] if palette else None, "ignore_index": ignore_index,
            "mean": list(mean), "std": list(std), "crop_size": _plain(crop_size), "inference": inference or {},
            "compile": compile, "log_per_class": log_per_class,
        })
        net_cfg = copy.deepcopy(dict(model))
        net_cfg["num_classes"] = num_classes
        enc = dict(net_cfg.get("encoder") or {})
        self._pretrained = enc.pop("pretrained", None)
        net_cfg["encoder"] = enc
        self.model: SETR = build_setr(net_cfg)
        # a plain attribute, not a registered submodule: checkpoints never carry torch.compile's `_orig_mod.`
        object.__setattr__(self, "_forward", torch.compile(self.model) if compile else self.model)
        self.val_metrics = SegMetrics(num_classes, ignore_index)
        self.test_metrics = SegMetrics(num_classes, ignore_index)
        self.val_miou_best = MaxMetric()
        self.last_scores: dict[str, dict[str, Any]] = {}

    # ------------------------------------------------------------------------------------------ setup
    def setup(self, stage: str) -> None:
        if stage == "fit" and self._pretrained:
            self.model.encoder.load_pretrained(self._pretrained)
            self._pretrained = None

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self._forward(images)

    # ------------------------------------------------------------------------------------------- train
    def compute_loss(self, outputs: dict[str, Any], target: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        ignore = self.hparams.ignore_index
        main = F.cross_entropy(outputs["out"], target, ignore_index=ignore)
        parts = {"loss_main": main}
        total = main
        for i, (logits, w) in enumerate(zip(outputs["aux"], self.model.aux_weights)):
            aux = F.cross_entropy(logits, target, ignore_index=ignore)
            parts[f"loss_aux{i}"] = aux
            total = total + w * aux
        if not torch.isfinite(total):
            raise FloatingPointError(f"loss is {total.item()} at step {self.global_step}: lower optimizer.lr")
        return total, parts

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        outputs = self(batch["image"])
        loss, parts = self.compute_loss(outputs, batch["mask"])
        bs = batch["image"].shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=bs)
        self.log_dict({f"train/{k}": v for k, v in parts.items()}, batch_size=bs)
        return loss

    # -------------------------------------------------------------------------------------- evaluation
    def predict_logits(self, images: torch.Tensor | list[torch.Tensor], out_sizes: list[tuple[int, int]]) -> list[torch.Tensor]:
        """Logits per image through the configured inference mode, each resized to its label size."""
        inf = self.hparams.inference
        if isinstance(images, torch.Tensor) and len({tuple(s) for s in out_sizes}) == 1:
            logits = infer(self._forward, images, inf, out_size=out_sizes[0])
            return list(logits)
        return [infer(self._forward, img[None], inf, out_size=size)[0] for img, size in zip(images, out_sizes)]

    def _eval_step(self, batch: dict[str, Any], metrics: SegMetrics, prefix: str) -> list[torch.Tensor]:
        masks = batch["mask"]
        masks = list(masks) if isinstance(masks, torch.Tensor) else masks
        logits = self.predict_logits(batch["image"], [tuple(m.shape[-2:]) for m in masks])
        loss = torch.stack([
            F.cross_entropy(lg[None].float(), m[None], ignore_index=self.hparams.ignore_index) for lg, m in zip(logits, masks)
        ]).nanmean()
        preds = [lg.argmax(0) for lg in logits]
        for p, m in zip(preds, masks):
            metrics.update(p[None], m[None])
        self.log(f"{prefix}/loss", loss, sync_dist=True, batch_size=len(masks))
        return preds

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> list[torch.Tensor]:
        return self._eval_step(batch, self.val_metrics, "val")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> list[torch.Tensor]:
        return self._eval_step(batch, self.test_metrics, "test")

    def _log_scores(self, metrics: SegMetrics, prefix: str) -> dict[str, Any]:
        scores = metrics.compute()  # all-reduced across processes by torchmetrics
        confmat = metrics.confmat.detach().cpu().clone()
        metrics.reset()
        for key in ("mIoU", "mAcc", "aAcc"):
            self.log(f"{prefix}/{key}", scores[key].float(), prog_bar=key == "mIoU", sync_dist=False)
        if self.hparams.log_per_class:
            for name, v in zip(self.hparams.class_names, scores["iou"]):
                if torch.isfinite(v):
                    self.log(f"{prefix}/IoU/{name}", v.float(), sync_dist=False)
        result = {"scores": {k: v.cpu() for k, v in scores.items()}, "confmat": confmat}
        self.last_scores[prefix] = result
        return result

    def on_validation_epoch_end(self) -> None:
        res = self._log_scores(self.val_metrics, "val")
        if not self.trainer.sanity_checking:
            self.val_miou_best(res["scores"]["mIoU"].float().to(self.device))
            self.log("val/mIoU_best", self.val_miou_best.compute(), sync_dist=False)

    def on_test_epoch_end(self) -> None:
        self._log_scores(self.test_metrics, "test")

    # ------------------------------------------------------------------------------------ optimization
    def configure_optimizers(self):
        cfg = dict(self.hparams.optimizer)
        optimizer = build_optimizer(self.model, cfg)
        sched = dict(cfg.get("scheduler") or {})
        total = sched.pop("total_steps", None) or int(self.trainer.estimated_stepping_batches)
        scheduler = build_scheduler(optimizer, sched, int(total), float(cfg.get("lr", 0.01)))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ------------------------------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["state_dict"] = strip_compile_prefix(checkpoint["state_dict"])
        run_config = getattr(self, "run_config", None)
        if run_config is not None:
            checkpoint["config"] = run_config

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["state_dict"] = strip_compile_prefix(checkpoint["state_dict"])


def load_checkpoint_module(path: str | Path, map_location: str | torch.device = "cpu",
                           **overrides: Any) -> tuple[SETRModule, dict[str, Any]]:
    """Load a checkpoint written by src/train.py: ``(SETRModule, checkpoint dict)``, with ``overrides`` of its
    hyperparameters (e.g. ``inference=...``; ``compile`` is always off). A missing or foreign file gives one
    :class:`SETRConfigError` line naming it."""
    path = Path(path)
    if not path.is_file():
        raise SETRConfigError(f"ckpt_path: checkpoint {path} not found")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as e:  # noqa: BLE001
        reason = (str(e).strip().splitlines() or [""])[0]
        raise SETRConfigError(f"ckpt_path: cannot read checkpoint {path} ({type(e).__name__}: {reason})") from e
    if not isinstance(ckpt, dict) or "hyper_parameters" not in ckpt or "state_dict" not in ckpt:
        raise SETRConfigError(f"ckpt_path: {path} is not a checkpoint written by src/train.py (no hyper_parameters)")
    hp = {**ckpt["hyper_parameters"], **overrides, "compile": False}
    module = SETRModule(**hp)
    module.load_state_dict(strip_compile_prefix(ckpt["state_dict"]))
    return module.to(map_location), ckpt


def load_checkpoint_model(path: str | Path, map_location: str | torch.device = "cpu") -> tuple[SETR, dict[str, Any]]:
    """Load a training checkpoint for inference: ``(SETR in eval mode, meta)``.

    ``meta`` holds ``num_classes, class_names, palette, mean, std, ignore_index, inference, crop_size`` (and
    ``config``, the resolved run config, when the checkpoint has it). A missing or foreign file gives one
    :class:`SETRConfigError` line naming it.
    """
    module, ckpt = load_checkpoint_module(path, map_location)
    hp = module.hparams
    meta = {k: hp[k] for k in ("num_classes", "class_names", "palette", "mean", "std", "ignore_index",
                               "inference", "crop_size")}
    if "config" in ckpt:
        meta["config"] = ckpt["config"]
    return module.model.eval(), meta
