"""The Lightning module: wires the SETR network, its losses, optimizer, schedule and metrics together.

It takes the checkpoint record (:class:`setr.checkpoint.ModelRecord`: model config, classes, palette,
normalisation, crop, inference settings) and the ``optimizer`` mapping as plain hyperparameters and builds the
network itself, so ``SETRModule.load_from_checkpoint(path)`` needs no extra arguments and
``setr.load_model(path)`` can rebuild the network without Lightning.

Scores: the module keeps one :class:`setr.metrics.SegMetrics` per stage and logs the scalar scores
(``val/mIoU``, per-class IoU, ...). The metric objects stay filled until the next evaluation starts, so the
report callback (:class:`setr.training.callbacks.MetricReport`) reads the same all-reduced result afterwards.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Mapping
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.trainer.states import TrainerFn
from torchmetrics import MaxMetric

from setr.checkpoint import ModelRecord, strip_compile_prefix
from setr.errors import SETRConfigError, TrainingDiverged
from setr.inference import infer
from setr.metrics import SegMetrics
from setr.models import SETR, build_setr
from setr.models.seg_loss import LOSS_PATHS, upsampled_cross_entropy
from setr.nodes import plain
from setr.training.loggers import continue_loggers
from setr.training.optim import build_optimizer, build_scheduler

METRIC_STATE_KEY = "metric_state"  # the checkpoint entry of the metric state that outlives an evaluation
RNG_STATE_KEY = "rng_state"  # the checkpoint entry of torch's RNG state (restored when a fit resumes)
FINITE_CHECK_EVERY = 50  # steps between loss-finiteness checks when trainer.log_every_n_steps is 0


def pop_compile(record: ModelRecord, compile: bool | None = None) -> tuple[ModelRecord, bool]:
    """``record`` without ``model.compile``, and whether to compile: ``compile`` when given, else that key."""
    model = dict(record.model)
    from_cfg = model.pop("compile", False)
    if from_cfg is None:
        from_cfg = False
    if not isinstance(from_cfg, bool):
        raise SETRConfigError(f"model.compile: expected true or false, got {from_cfg!r}")
    if compile is None:
        compile = from_cfg
    elif not isinstance(compile, bool):
        raise SETRConfigError(f"model.compile: expected true or false, got {compile!r}")
    return dataclasses.replace(record, model=model), compile


def pop_loss_path(record: ModelRecord) -> tuple[ModelRecord, str]:
    """``record`` without ``model.loss_path`` (a run setting, like ``model.compile``: checkpoints never carry
    it), and its value (``fused`` when absent)."""
    model = dict(record.model)
    path = model.pop("loss_path", None) or "fused"
    if path not in LOSS_PATHS:
        raise SETRConfigError(f"model.loss_path: expected one of {', '.join(LOSS_PATHS)}, got {path!r}")
    return dataclasses.replace(record, model=model), path


class SETRModule(L.LightningModule):
    """SETR training / evaluation.

    Args:
        record: the :class:`~setr.checkpoint.ModelRecord` (or its dict) of what the weights are: model config,
            class names, palette, mean / std, ignore index, crop, inference settings, test-time resize.
        optimizer: the ``optimizer`` node (``name``, ``lr``, ``head_lr_mult``, ``scheduler``, ...).
        pretrained: a local ImageNet weights file for the encoder, loaded once at the start of fitting (never
            when a checkpoint is loaded; not part of the record).
        compile: run the network through ``torch.compile`` (checkpoints stay free of ``_orig_mod.``); None: the
            record's ``model.compile`` (``model.compile=true``), which is taken out of the record (a run setting,
            not part of what the weights are: checkpoints and ``setr.load_model`` never see it).
        log_per_class: log per-class IoU as ``val/IoU/<class>``.
    """

    def __init__(self, record: ModelRecord | Mapping, optimizer: Mapping | None = None, pretrained: str | None = None,
                 compile: bool | None = None, log_per_class: bool = True) -> None:
        super().__init__()
        if not isinstance(record, ModelRecord):
            record = ModelRecord.from_dict(plain(record))
        record, compile = pop_compile(record, compile)
        record, self.loss_path = pop_loss_path(record)
        optimizer = plain(optimizer) or {"name": "sgd", "lr": 0.01}
        self.save_hyperparameters({"record": record.to_dict(), "optimizer": optimizer,
                                   "pretrained": str(pretrained) if pretrained else None,
                                   "compile": bool(compile), "log_per_class": log_per_class})
        self.record = record
        self._pretrained = pretrained
        self.model: SETR = build_setr(copy.deepcopy(record.model))
        # a plain attribute, not a registered submodule: checkpoints never carry torch.compile's `_orig_mod.`
        object.__setattr__(self, "_forward", torch.compile(self.model) if compile else self.model)
        self.val_metrics = SegMetrics(record.num_classes, record.ignore_index)
        self.test_metrics = SegMetrics(record.num_classes, record.ignore_index)
        self.val_miou_best = MaxMetric()

    def metrics_for(self, split: str) -> SegMetrics:
        """The metric object of ``split`` (``val`` or ``test``): filled from the end of that evaluation until
        the next one starts."""
        return {"val": self.val_metrics, "test": self.test_metrics}[split]

    # ------------------------------------------------------------------------------------------ setup
    def setup(self, stage: str) -> None:
        if stage == "fit" and self._pretrained:
            self.model.encoder.load_pretrained(self._pretrained)
            self._pretrained = None

    def forward(self, images: torch.Tensor, low_res: bool | None = None):
        """The network; in training mode with ``model.loss_path=fused`` (``low_res`` None) or ``low_res=True`` it
        returns the heads' logits before their resize to the input (what :meth:`compute_loss` takes)."""
        if low_res is None:
            low_res = self.training and self.loss_path == "fused"
        return self._forward(images, low_res=low_res) if low_res else self._forward(images)

    # ------------------------------------------------------------------------------------------- train
    def compute_loss(self, outputs: dict[str, Any],
                     target: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Weighted cross-entropy of the decode and auxiliary logits, always in float32 (under
        ``trainer.precision=bf16-mixed`` / ``16-mixed`` the network's logits are half precision: the softmax and
        the mean over pixels are not).

        ``outputs`` of the network at the input size (``{"out", "aux"}``): ``F.cross_entropy`` of those logits
        (``model.loss_path=reference``). With the heads' logits before the resize (``"size"`` and ``"crop"`` in
        ``outputs``: ``model.loss_path=fused``, the default): :func:`setr.models.seg_loss.upsampled_cross_entropy`,
        the same values and gradients without full-resolution float32 logits. A non-finite loss is remembered on
        the device (no host sync) and stops training at the next check (:meth:`training_step`)."""
        ignore = self.record.ignore_index
        if "size" in outputs:
            size, crop = outputs["size"], tuple(outputs["crop"])
            if tuple(target.shape[-2:]) != crop:
                raise ValueError(f"compute_loss: the label is {tuple(target.shape[-2:])}, the images {crop}")

            def ce(logits: torch.Tensor) -> torch.Tensor:
                return upsampled_cross_entropy(logits, target, size, align_corners=False, ignore_index=ignore)
        else:
            def ce(logits: torch.Tensor) -> torch.Tensor:
                return F.cross_entropy(logits.float(), target, ignore_index=ignore)
        main = ce(outputs["out"])
        parts = {"loss_main": main}
        total = main
        for i, (logits, w) in enumerate(zip(outputs["aux"], self.model.aux_weights)):
            aux = ce(logits)
            parts[f"loss_aux{i}"] = aux
            total = total + w * aux
        self._watch_finite(total)
        return total, parts

    def _watch_finite(self, total: torch.Tensor) -> None:
        """Remember, on the loss's device, the first training step whose loss is not finite and that loss
        (``(step, value)``; step -1: none yet). Device operations only: no host sync."""
        if self._trainer is None:
            return
        total = total.detach().float()
        step, value = getattr(self, "_nonfinite", None) or (None, None)
        if step is None or step.device != total.device:
            step = torch.full((), -1, dtype=torch.long, device=total.device)
            value = torch.zeros((), dtype=torch.float32, device=total.device)
        first = ~torch.isfinite(total) & (step < 0)
        self._nonfinite = (torch.where(first, self.global_step, step), torch.where(first, total, value))

    def check_finite(self) -> None:
        """Raise :class:`TrainingDiverged` (one line naming the first step whose loss was not finite) if any loss
        since the start of the run was not; a host sync. Called where the step syncs anyway (the steps whose
        metrics are logged, the start of a validation), before a checkpoint is written and when training ends."""
        state = getattr(self, "_nonfinite", None)
        if state is None:
            return
        step = int(state[0])
        if step >= 0:
            raise TrainingDiverged(self._diverged_message(float(state[1]), step))

    def _diverged_message(self, value: float, step: int | None = None) -> str:
        """One line: the step, and the settings that keep a run from diverging (with their current values)."""
        lr = self.hparams.optimizer.get("lr") if isinstance(self.hparams.optimizer, Mapping) else None
        trainer = self._trainer
        clip = getattr(trainer, "gradient_clip_val", None) if trainer is not None else None
        precision = str(getattr(trainer, "precision", "")) if trainer is not None else ""
        hints = [f"lower optimizer.lr (now {lr})",
                 f"lower trainer.gradient_clip_val (now {clip})" if clip else
                 f"set trainer.gradient_clip_val (e.g. 1.0; now {'null' if clip is None else clip})"]
        if precision.startswith("16"):
            hints.append("use trainer.precision=bf16-mixed (or 32-true) instead of 16-mixed")
        if step is None:
            step = self.global_step if trainer is not None else "?"
        return f"train/loss is {value} at step {step}: training diverged; {', '.join(hints)}"

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        outputs = self(batch["image"])
        loss, parts = self.compute_loss(outputs, batch["mask"])
        bs = batch["image"].shape[0]
        # logged on the device: Lightning reads them to the host on the steps it logs (trainer.log_every_n_steps)
        self.log("train/loss", loss, batch_size=bs)
        self.log_dict({f"train/{k}": v for k, v in parts.items()}, batch_size=bs)
        if self._finite_check_due():  # a step that syncs anyway: check the loss, and show it in the progress bar
            self.check_finite()
            # on the host: Lightning turns progress-bar values into numbers after every step, so a device tensor
            # there would cost a host sync per step
            self.log("loss", loss.detach().float().cpu(), prog_bar=True, logger=False, batch_size=bs)
        return loss

    def _finite_check_due(self) -> bool:
        """Whether this step checks the loss's finiteness: the steps whose metrics Lightning logs (it reads them
        to the host then anyway: ``trainer.log_every_n_steps``), or every :data:`FINITE_CHECK_EVERY` steps when
        nothing is logged."""
        trainer = self.trainer
        if trainer.log_every_n_steps > 0:
            return bool(trainer._logger_connector.should_update_logs)
        return (self.global_step + 1) % FINITE_CHECK_EVERY == 0

    def on_train_end(self) -> None:
        self.check_finite()  # a loss that went non-finite after the last check

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        """End every run with a validation of its final weights: on the last step of the budget (or the last
        batch of the last epoch) ask Lightning to stop, which validates now even when this step is not a
        validation step (and once only when it is). The final metrics, checkpoints and report then describe
        the weights the run ends with."""
        trainer = self.trainer
        if not trainer.enable_validation:
            return
        last_step = trainer.max_steps is not None and 0 < trainer.max_steps <= trainer.global_step
        last_epoch = (trainer.max_epochs is not None and trainer.max_epochs > 0
                      and trainer.current_epoch + 1 >= trainer.max_epochs
                      and trainer.fit_loop.epoch_loop.batch_progress.is_last_batch)
        if last_step or last_epoch:
            trainer.should_stop = True

    # -------------------------------------------------------------------------------------- evaluation
    def predict_logits(self, images: torch.Tensor | list[torch.Tensor],
                       out_sizes: list[tuple[int, int]]) -> list[torch.Tensor]:
        """Float32 logits per image through the record's inference settings, each resized to its label size (the
        loss, argmax and metrics of evaluation run on them in float32 under mixed precision too)."""
        inf = self.record.inference
        if isinstance(images, torch.Tensor) and len({tuple(s) for s in out_sizes}) == 1:
            logits = infer(self._forward, images, inf, out_size=out_sizes[0]).float()
            return list(logits)
        return [infer(self._forward, img[None], inf, out_size=size)[0].float() for img, size in zip(images, out_sizes)]

    def _eval_step(self, batch: dict[str, Any], metrics: SegMetrics, prefix: str) -> list[torch.Tensor]:
        masks = batch["mask"]
        masks = list(masks) if isinstance(masks, torch.Tensor) else masks
        logits = self.predict_logits(batch["image"], [tuple(m.shape[-2:]) for m in masks])
        ignore = self.record.ignore_index
        loss = torch.stack([
            F.cross_entropy(lg[None].float(), m[None], ignore_index=ignore) for lg, m in zip(logits, masks)
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

    def on_validation_epoch_start(self) -> None:
        self.check_finite()  # a validation syncs anyway: a diverged run stops here, naming its step, not on NaN logits
        self.val_metrics.reset()

    def on_test_epoch_start(self) -> None:
        self.test_metrics.reset()

    def _log_scores(self, metrics: SegMetrics, prefix: str) -> dict[str, torch.Tensor]:
        scores = metrics.compute()  # all-reduced across processes by torchmetrics (and cached until reset)
        for key in ("mIoU", "mAcc", "aAcc"):
            self.log(f"{prefix}/{key}", scores[key].float(), prog_bar=key == "mIoU", sync_dist=False)
        if self.hparams.log_per_class:
            for name, v in zip(self.record.class_names, scores["iou"]):
                if torch.isfinite(v):
                    self.log(f"{prefix}/IoU/{name}", v.float(), sync_dist=False)
        return scores

    def on_validation_epoch_end(self) -> None:
        scores = self._log_scores(self.val_metrics, "val")
        if not self.trainer.sanity_checking:
            self.val_miou_best(scores["mIoU"].float().to(self.device))
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
        """Besides the weights: the run's config, the state of the metrics that outlive an evaluation
        (``metric_state``: without it a resumed run's ``val/mIoU_best`` forgot the validations before the resume)
        and torch's RNG (``rng_state``). Lightning adds the rest: optimizer, schedule, loops, loader position,
        callbacks (early stopping, checkpoint bookkeeping)."""
        self.check_finite()  # never a checkpoint of diverged weights
        checkpoint["state_dict"] = strip_compile_prefix(checkpoint["state_dict"])
        run_config = getattr(self, "run_config", None)
        if run_config is not None:
            checkpoint["config"] = run_config
        checkpoint[METRIC_STATE_KEY] = self._metric_state()
        checkpoint[RNG_STATE_KEY] = self._rng_state()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Restore the metric state; when a fit resumes, restore torch's RNG and continue the loggers' history at
        the checkpoint's step."""
        checkpoint["state_dict"] = strip_compile_prefix(checkpoint["state_dict"])
        self._load_metric_state(checkpoint.get(METRIC_STATE_KEY) or {})
        trainer = self._trainer
        if trainer is not None and trainer.state.fn == TrainerFn.FITTING:
            self._load_rng_state(checkpoint.get(RNG_STATE_KEY) or {}, trainer.strategy.root_device)
            continue_loggers(trainer, int(checkpoint.get("global_step", 0)))

    def _rng_state(self) -> dict[str, torch.Tensor]:
        """torch's RNG (CPU, and the GPU this process trains on): drop path and dropout draw from it, so without
        it a resumed run drew other masks than the straight run. The data does not draw from it (augmentations
        are seeded per sample and epoch; the loaders have generators of their own). Under DDP the checkpoint holds
        rank 0's state, which every rank restores: ranks seeded alike and running the same operations draw
        alike."""
        state = {"torch": torch.get_rng_state()}
        if self.device.type == "cuda":
            state["cuda"] = torch.cuda.get_rng_state(self.device)
        return state

    @staticmethod
    def _load_rng_state(state: Mapping[str, torch.Tensor], device: torch.device) -> None:
        """The inverse of :meth:`_rng_state` (a checkpoint written before it was saved keeps the seeded RNG)."""
        if "torch" in state:
            torch.set_rng_state(torch.as_tensor(state["torch"]).cpu())
        if "cuda" in state and device.type == "cuda":
            torch.cuda.set_rng_state(torch.as_tensor(state["cuda"]).cpu(), device)

    def _metric_state(self) -> dict[str, Any]:
        """What the module's metrics carry from one evaluation to the next: the best ``val/mIoU`` so far (None
        before the first validation). ``val_metrics`` / ``test_metrics`` are not saved: each evaluation starts
        them afresh."""
        best = self.val_miou_best
        return {"val/mIoU_best": best.max_value.detach().cpu().clone() if best.update_count else None}

    def _load_metric_state(self, state: dict[str, Any]) -> None:
        """The inverse of :meth:`_metric_state`; a checkpoint without it (written before it was saved) restarts
        the best score at the next validation."""
        self.val_miou_best.reset()
        best = state.get("val/mIoU_best")
        if best is not None:
            self.val_miou_best.update(torch.as_tensor(best).to(self.val_miou_best.device))
