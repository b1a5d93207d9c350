"""``src/train.py``: build the data module, the Lightning module, loggers, callbacks and trainer from the composed
config, fit (resuming where asked), optionally test the best checkpoint, write ``metrics.json``.

The run always ends with the validation scores of its final weights (:class:`SETRModule` validates at the last
step even when it is not a validation step), and :class:`setr.training.callbacks.MetricReport` writes the
per-class report of that validation.
"""

from __future__ import annotations

import logging
import os
import secrets
import string
from pathlib import Path
from typing import Any

import lightning as L
from omegaconf import DictConfig, OmegaConf, open_dict

from setr.checkpoint import ModelRecord
from setr.errors import SETRConfigError
from setr.inference import check_inference
from setr.nodes import plain
from setr.training import SegDataModule, SETRModule
from setr.training.checkpoint_io import use_atomic_checkpoints
from setr.training.loggers import log_wandb_run_line
from setr.training.preemption import Preemption, watch_parent
from setr.utils.config import (
    check_config,
    check_pretrained,
    cpu_only,
    extras,
    instantiate_group,
    instantiate_trainer,
    show_config,
)
from setr.utils.distributed import is_rank_zero, patch_lightning_hydra_ddp
from setr.utils.launch import task_wrapper
from setr.utils.output import collect_metrics, print_last_line, write_metrics
from setr.utils.resume import check_resume, resolve_ckpt_path

log = logging.getLogger("setr")


def setup_wandb(cfg: DictConfig) -> None:
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


def build_callbacks(cfg: DictConfig, loggers: list[Any]) -> list[L.Callback]:
    """The ``callbacks`` group; those that need a logger (``LearningRateMonitor``) are left out, with a line
    saying so, when the run has none (``logger=null``, ``debug=fdr``)."""
    from lightning.pytorch.callbacks import LearningRateMonitor

    callbacks = instantiate_group(cfg.get("callbacks"), "callbacks")
    if not loggers:
        dropped = [cb for cb in callbacks if isinstance(cb, LearningRateMonitor)]
        for cb in dropped:
            log.info("callbacks: %s needs a logger and this run has none; left out", type(cb).__name__)
        callbacks = [cb for cb in callbacks if cb not in dropped]
    return callbacks


def prepare(cfg: DictConfig) -> tuple[SegDataModule, ModelRecord]:
    """The checks that need nothing built, then the data module (lazy) and the model record of the config."""
    if "compile" in cfg:  # a stale override must not silently train uncompiled
        raise SETRConfigError("compile: moved to model.compile (e.g. `model.compile=true`)")
    check_config(cfg, data=True)  # every check that needs nothing built: before the config is printed
    check_inference(plain(cfg.data.get("inference")))  # validation's windows cover every pixel, or one line
    if cfg.get("train", True):
        check_pretrained(cfg)  # a missing ImageNet weights file stops here, before any data or model is built
    extras(cfg, print_tree=False)  # printed by _train after the checkpoint checks: an error comes first
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    datamodule = SegDataModule(plain(cfg.data), seed=cfg.seed)
    record = ModelRecord.from_config(cfg, class_names=datamodule.class_names, palette=datamodule.palette)
    return datamodule, record


def build(cfg: DictConfig, record: ModelRecord, preemption: Preemption | None = None) -> tuple[SETRModule, L.Trainer]:
    """The Lightning module, loggers, callbacks and trainer (after :func:`prepare`)."""
    module = SETRModule(
        record=record,
        optimizer=plain(cfg.get("optimizer") or {"name": "sgd", "lr": 0.01}),
        pretrained=(cfg.model.get("encoder") or {}).get("pretrained"),
    )  # model.compile: read (and checked) from the record by SETRModule
    module.run_config = OmegaConf.to_container(cfg, resolve=True)
    setup_wandb(cfg)
    loggers = instantiate_group(cfg.get("logger"), "logger")
    callbacks = build_callbacks(cfg, loggers) + ([preemption] if preemption is not None else [])
    trainer_cfg = plain(cfg.trainer)
    if trainer_cfg.get("sync_batchnorm") and cpu_only(trainer_cfg):
        log.info("trainer.sync_batchnorm: PyTorch's SyncBatchNorm runs on GPUs only; keeping BatchNorm on CPU")
        trainer_cfg["sync_batchnorm"] = False
    # always: `strategy` is a DDPStrategy node (no lowercase "ddp" in it) or "auto" with devices > 1 (DDP too)
    patch_lightning_hydra_ddp()
    trainer: L.Trainer = instantiate_trainer(trainer_cfg, callbacks=callbacks, logger=loggers or False)
    use_atomic_checkpoints(trainer)  # a kill or a full disk never leaves a partial last.ckpt (whatever $TMPDIR is)
    if preemption is not None:
        preemption.trainer = trainer  # a signal before fit starts reaches the DDP processes it started
    return module, trainer


def train(cfg: DictConfig) -> dict[str, float]:
    """Fit (and test with ``test=true``); returns the final metrics (``val/*`` of the final weights included).

    SIGTERM / SIGINT / SIGUSR1 are handled from here on (:mod:`setr.training.preemption`): during training they
    save the current step and stop with exit code 128 + signal and the resume command; before or after, they
    stop at once. A DDP process Lightning started for another rank exits when its rank 0 is gone."""
    watch_parent()
    preemption = Preemption()
    preemption.install()
    try:
        return _train(cfg, preemption)
    finally:
        preemption.uninstall()
        log_wandb_run_line()  # offline: the `wandb sync` command of this run's folder (also when it stopped early)


def _train(cfg: DictConfig, preemption: Preemption) -> dict[str, float]:
    datamodule, record = prepare(cfg)
    ckpt_path = resolve_ckpt_path(cfg)
    if ckpt_path and cfg.get("train", True):  # another model: one line; a finished run: its metrics, nothing written
        finished = check_resume(cfg, ckpt_path, record)
        if finished is not None:
            return finished
    show_config(cfg)  # after every check: an error is the first thing a user sees
    module, trainer = build(cfg, record, preemption)
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
        write_metrics(metrics, cfg.paths.output_dir)
        cb = trainer.checkpoint_callback
        if cb is not None and cb.best_model_path:
            log.info("best checkpoint: %s (%s %.4f)", cb.best_model_path, cb.monitor,
                     float(cb.best_model_score) if cb.best_model_score is not None else float("nan"))
    return metrics


@task_wrapper
def run(cfg: DictConfig) -> float | None:
    """The job of ``src/train.py``: train, print the final JSON line (rank 0), return the metric a sweep
    optimises (``metric``, default ``val/mIoU``)."""
    metrics = train(cfg)
    if is_rank_zero():
        print_last_line(metrics)
    value = metrics.get(cfg.get("metric", "val/mIoU"))
    return float(value) if value is not None else None
