"""The work behind src/train.py and src/eval.py: build everything from the composed config and run it."""

from __future__ import annotations

import logging
import os
import secrets
import string
from pathlib import Path
from typing import Any

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from setr.errors import SETRConfigError
from setr.training import SegDataModule, SETRModule
from setr.training.callbacks import WandbSegmentationLogger
from setr.utils.run import (
    check_config,
    collect_metrics,
    cpu_only,
    extras,
    instantiate_group,
    is_rank_zero,
    patch_lightning_hydra_ddp,
    resolve_ckpt_path,
    write_metrics,
)

log = logging.getLogger("setr")


def _plain(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node


def _setup_wandb(cfg: DictConfig) -> None:
    """W&B without an account: offline unless WANDB_MODE says otherwise; re-attach the run id on resume."""
    if not cfg.get("logger") or "wandb" not in cfg.logger:
        return
    node = cfg.logger.wandb
    out = Path(cfg.paths.output_dir)
    id_file = out / "wandb_run_id.txt"
    with open_dict(node):
        if os.environ.get("WANDB_MODE", "").lower() == "online":
            node.offline = False
        if node.get("offline", True):
            os.environ.setdefault("WANDB_MODE", "offline")
        os.environ.setdefault("WANDB_SILENT", "true")
        os.environ.setdefault("WANDB_CONSOLE", "off")
        if id_file.is_file():
            node.id = id_file.read_text().strip()
            node.resume = "allow"
        elif not node.get("id"):  # W&B's own id format: 8 base-36 characters (wandb.util.generate_id is gone)
            node.id = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))
        if is_rank_zero():
            out.mkdir(parents=True, exist_ok=True)
            id_file.write_text(str(node.id) + "\n")


def build(cfg: DictConfig) -> tuple[SegDataModule, SETRModule, L.Trainer]:
    check_config(cfg)
    extras(cfg)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    datamodule = SegDataModule(_plain(cfg.data), seed=cfg.seed)
    data = cfg.data
    module = SETRModule(
        model=_plain(cfg.model),
        optimizer=_plain(cfg.get("optimizer") or {"name": "sgd", "lr": 0.01}),
        num_classes=data.num_classes,
        class_names=datamodule.class_names,
        palette=datamodule.palette,
        ignore_index=data.get("ignore_index", 255),
        mean=list(data.mean),
        std=list(data.std),
        crop_size=_plain(data.crop_size),
        inference=_plain(data.get("inference")),
        compile=bool(cfg.get("compile", False)),
    )
    module.run_config = OmegaConf.to_container(cfg, resolve=True)
    _setup_wandb(cfg)
    callbacks = instantiate_group(cfg.get("callbacks"), "callbacks")
    loggers = instantiate_group(cfg.get("logger"), "logger")
    trainer_cfg = OmegaConf.to_container(cfg.trainer, resolve=True)
    if trainer_cfg.get("sync_batchnorm") and cpu_only(trainer_cfg):
        log.info("trainer.sync_batchnorm: PyTorch's SyncBatchNorm runs on GPUs only; keeping BatchNorm on CPU")
        trainer_cfg["sync_batchnorm"] = False
    # always: `strategy` is a DDPStrategy node (no lowercase "ddp" in it) or "auto" with devices > 1 (DDP too)
    patch_lightning_hydra_ddp()
    from hydra.utils import instantiate

    try:
        trainer: L.Trainer = instantiate(trainer_cfg, callbacks=callbacks, logger=loggers or False, _convert_="all")
    except Exception as e:  # noqa: BLE001 - Lightning's own argument errors, one line
        cause = e.__cause__ or e
        raise SETRConfigError(f"trainer: {str(cause).splitlines()[0]}") from e
    return datamodule, module, trainer


def train(cfg: DictConfig) -> dict[str, float]:
    datamodule, module, trainer = build(cfg)
    ckpt_path = resolve_ckpt_path(cfg)
    for lg in trainer.loggers:  # the full resolved config, not only the module's hyperparameters
        lg.log_hyperparams(module.run_config)
    if cfg.get("train", True):
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    metrics = collect_metrics(trainer.callback_metrics)
    if cfg.get("test"):
        best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
        trainer.test(module, datamodule=datamodule, ckpt_path=best or None)
        metrics.update(collect_metrics(trainer.callback_metrics, prefixes=("test/",)))
    metrics["global_step"] = float(trainer.global_step)
    if trainer.is_global_zero:
        # W&B already has the last validation's per-class table when the samples callback ran
        val_table_logged = any(isinstance(cb, WandbSegmentationLogger) for cb in trainer.callbacks)
        for split in ("val", "test"):  # the last evaluation of each split: table, CSV / JSON, confusion PNG
            if split in module.last_scores:
                _report(module.last_scores[split], module.hparams.class_names, Path(cfg.paths.output_dir), split,
                        trainer.loggers, trainer.global_step, wandb_table=not (split == "val" and val_table_logged))
        write_metrics(metrics, cfg.paths.output_dir)
        cb = trainer.checkpoint_callback
        if cb is not None and cb.best_model_path:
            log.info("best checkpoint: %s (%s %.4f)", cb.best_model_path, cb.monitor,
                     float(cb.best_model_score) if cb.best_model_score is not None else float("nan"))
    return metrics


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Score ``cfg.ckpt_path`` on ``cfg.data`` (its ``split``) with ``cfg.data.inference``."""
    from setr.training.module import load_checkpoint_module

    check_config(cfg)
    extras(cfg)
    module, _ = load_checkpoint_module(str(cfg.ckpt_path), inference=_plain(cfg.data.get("inference")))
    if module.hparams.num_classes != cfg.data.num_classes:
        raise SETRConfigError(
            f"data.num_classes: the checkpoint predicts {module.hparams.num_classes} classes, data={cfg.data.name} "
            f"has {cfg.data.num_classes}")
    datamodule = SegDataModule(_plain(cfg.data), seed=cfg.seed)
    loggers = instantiate_group(cfg.get("logger"), "logger")
    trainer_cfg = OmegaConf.to_container(cfg.trainer, resolve=True)
    for key in ("max_epochs", "max_steps", "check_val_every_n_epoch", "val_check_interval", "sync_batchnorm",
                "gradient_clip_val", "accumulate_grad_batches"):
        trainer_cfg.pop(key, None)
    from hydra.utils import instantiate

    trainer: L.Trainer = instantiate(trainer_cfg, logger=loggers or False, callbacks=[], _convert_="all")
    split = cfg.get("split", "val")
    if split == "val":
        trainer.validate(module, datamodule=datamodule)
    elif split == "test":
        trainer.test(module, datamodule=datamodule)
    else:
        raise SETRConfigError(f"split: use val or test, got {split!r}")
    result = module.last_scores[split]
    metrics = {f"{split}/{k}": float(result["scores"][k]) for k in ("mIoU", "mAcc", "aAcc")}
    for name, v in zip(module.hparams.class_names, result["scores"]["iou"]):
        metrics[f"{split}/IoU/{name}"] = float(v)
    if trainer.is_global_zero:
        out = Path(cfg.paths.output_dir)
        _report(result, module.hparams.class_names, out, split, trainer.loggers)
        write_metrics(metrics, out)
    return metrics


def _report(result: dict[str, Any], class_names, out_dir: Path, split: str, loggers=(), step: int | None = None,
            wandb_table: bool = True) -> None:
    """Per-class table on the console; CSV / JSON / confusion PNG next to the run; confusion (+ table) to W&B."""
    from setr import report

    report.print_table(result["scores"], class_names, title=f"{split} scores")
    paths = report.save_report(result["scores"], class_names, out_dir, result["confmat"], prefix=split)
    report.log_to_wandb(loggers, paths, result["scores"], class_names, prefix=split, step=step, table=wandb_table)
    log.info("%s report: %s", split, ", ".join(str(p) for p in paths.values()))
