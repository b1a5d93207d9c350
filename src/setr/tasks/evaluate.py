"""``src/eval.py``: score a checkpoint on a dataset split with the configured inference mode.

The checkpoint is read as weights only (:func:`setr.checkpoint.read_checkpoint`); ``data.inference`` of the
command line replaces the record's inference settings. The per-class table, CSV / JSON
and confusion matrix come from the same :class:`~setr.training.callbacks.MetricReport` as in training.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import lightning as L
from omegaconf import DictConfig

from setr.checkpoint import network_state, read_checkpoint, record_of
from setr.errors import SETRConfigError
from setr.training import SegDataModule, SETRModule
from setr.training.callbacks import MetricReport
from setr.utils.config import check_config, extras, instantiate_group, instantiate_trainer, plain
from setr.utils.launch import task_wrapper
from setr.utils.output import print_last_line, write_metrics

# trainer keys that only mean something while fitting
FIT_ONLY = ("max_epochs", "max_steps", "check_val_every_n_epoch", "val_check_interval", "sync_batchnorm",
            "gradient_clip_val", "accumulate_grad_batches")


def load_module(path: str | Path, inference: dict[str, Any] | None = None) -> SETRModule:
    """The Lightning module of a checkpoint for evaluation (weights only, compile off), with ``inference``
    replacing the record's settings when given."""
    ckpt = read_checkpoint(path)
    record = record_of(ckpt, path)
    if inference:
        record = dataclasses.replace(record, inference=inference)
    module = SETRModule(record=record, optimizer=ckpt["hyper_parameters"].get("optimizer"))
    module.model.load_state_dict(network_state(ckpt["state_dict"]))
    return module


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Score ``cfg.ckpt_path`` on ``cfg.data`` (its ``split``) with ``cfg.data.inference``."""
    check_config(cfg)
    extras(cfg)
    split = cfg.get("split", "val")
    if split not in ("val", "test"):
        raise SETRConfigError(f"split: use val or test, got {split!r}")
    module = load_module(str(cfg.ckpt_path), inference=plain(cfg.data.get("inference")))
    if module.record.num_classes != cfg.data.num_classes:
        raise SETRConfigError(
            f"data.num_classes: the checkpoint predicts {module.record.num_classes} classes, data={cfg.data.name} "
            f"has {cfg.data.num_classes}")
    datamodule = SegDataModule(plain(cfg.data), seed=cfg.seed)
    loggers = instantiate_group(cfg.get("logger"), "logger")
    trainer_cfg = {k: v for k, v in plain(cfg.trainer).items() if k not in FIT_ONLY}
    report = MetricReport(output_dir=cfg.paths.output_dir)
    trainer: L.Trainer = instantiate_trainer(trainer_cfg, logger=loggers or False, callbacks=[report])
    if split == "val":
        trainer.validate(module, datamodule=datamodule)
    else:
        trainer.test(module, datamodule=datamodule)
    scores = module.metrics_for(split).compute()
    metrics = {f"{split}/{k}": float(scores[k]) for k in ("mIoU", "mAcc", "aAcc")}
    for name, v in zip(module.record.class_names, scores["iou"]):
        metrics[f"{split}/IoU/{name}"] = float(v)
    if trainer.is_global_zero:
        write_metrics(metrics, cfg.paths.output_dir)
    return metrics


@task_wrapper
def run(cfg: DictConfig) -> dict[str, Any]:
    """The job of ``src/eval.py``: evaluate and print the final JSON line."""
    metrics = evaluate(cfg)
    print_last_line(metrics)
    return metrics
