"""``src/eval.py``: score a checkpoint on a dataset split with the configured inference mode.

The checkpoint is read as weights only (:func:`setr.convert.read_or_convert`); ``data.inference`` of the
command line replaces the record's inference settings. A released SETR checkpoint (official fudan-zvg/SETR or
mmsegmentation) is taken directly: converted in memory with ``python -m setr.convert``'s defaults, the data config
giving its class names, palette and test resize (a line says so). The per-class table, CSV / JSON
and confusion matrix come from the same :class:`~setr.training.callbacks.MetricReport` as in training.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning as L
from omegaconf import DictConfig

from setr.checkpoint import network_state, record_of
from setr.convert import read_or_convert
from setr.errors import SETRConfigError
from setr.training import SegDataModule, SETRModule
from setr.training.callbacks import MetricReport
from setr.utils.config import check_config, extras, instantiate_group, instantiate_trainer, plain
from setr.utils.launch import task_wrapper
from setr.utils.output import print_last_line, write_metrics

log = logging.getLogger("setr")

# trainer keys that only mean something while fitting
FIT_ONLY = ("max_epochs", "max_steps", "check_val_every_n_epoch", "val_check_interval", "sync_batchnorm",
            "gradient_clip_val", "accumulate_grad_batches")


def load_module(path: str | Path, inference: dict[str, Any] | None = None,
                data: Mapping[str, Any] | None = None, convert: Mapping[str, Any] | None = None) -> SETRModule:
    """The Lightning module of a checkpoint for evaluation (weights only, compile off), with ``inference``
    replacing the record's settings when given. A released SETR checkpoint is converted in memory, ``data`` (the
    data config) standing in for ``python -m setr.convert --data`` and ``convert`` (``num_heads``, ``out_indices``)
    for its other flags."""
    convert = dict(convert or {})
    ckpt = read_or_convert(path, data=data, num_heads=convert.get("num_heads"),
                           out_indices=convert.get("out_indices"))
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
    datamodule = SegDataModule(plain(cfg.data), seed=cfg.seed)  # lazy: datasets are built on first use
    # for a released checkpoint: the data's class names and palette (the dataset's own when the config has none)
    hint = {**plain(cfg.data), "class_names": plain(cfg.data.get("class_names")) or (lambda: datamodule.class_names),
            "palette": lambda: datamodule.palette}
    module = load_module(str(cfg.ckpt_path), inference=plain(cfg.data.get("inference")), data=hint,
                         convert=plain(cfg.get("convert")))
    if module.record.num_classes != cfg.data.num_classes:
        raise SETRConfigError(
            f"data.num_classes: the checkpoint predicts {module.record.num_classes} classes, data={cfg.data.name} "
            f"has {cfg.data.num_classes}")
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
    metrics.update(compare_published(metrics, split, plain(cfg.get("published")), module.record.inference))
    if trainer.is_global_zero:
        write_metrics(metrics, cfg.paths.output_dir)
    return metrics


def protocol_of(inference: Mapping[str, Any]) -> str:
    """``ms`` when the inference settings test several scales or flips (the papers' MS column), else ``ss``."""
    return "ms" if len(inference.get("scales") or [1.0]) > 1 or inference.get("flip") else "ss"


def compare_published(metrics: Mapping[str, float], split: str, published: Mapping[str, Any] | None,
                      inference: Mapping[str, Any]) -> dict[str, Any]:
    """The published mIoU of the preset for this protocol beside the measured one: a printed line, and
    ``published/mIoU`` (a fraction, like ``val/mIoU``), ``published/protocol``, ``published/source`` and
    ``diff/mIoU`` (measured - published) for the JSON line. Nothing without a preset or a published number."""
    if not published:
        return {}
    protocol = protocol_of(inference)
    value = published.get(protocol)
    if value is None:
        log.info("published: the preset has no %s number (%s)", protocol.upper(), published.get("source", ""))
        return {}
    ref, got = float(value) / 100.0, float(metrics[f"{split}/mIoU"])
    log.info("mIoU %.2f measured, %.2f published (%s, %s): %+.2f", 100 * got, 100 * ref, protocol.upper(),
             published.get("source", "?"), 100 * (got - ref))
    return {"published/mIoU": ref, "published/protocol": protocol, "published/source": published.get("source"),
            "diff/mIoU": got - ref}


@task_wrapper
def run(cfg: DictConfig) -> dict[str, Any]:
    """The job of ``src/eval.py``: evaluate and print the final JSON line."""
    metrics = evaluate(cfg)
    print_last_line(metrics)
    return metrics
