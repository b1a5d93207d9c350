"""Config checks and the objects built from config groups (callbacks, loggers), before anything heavy runs."""

from __future__ import annotations

import logging
import math
import sys
import warnings
from collections.abc import Mapping
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from setr.errors import SETRConfigError
from setr.utils.distributed import is_rank_zero

log = logging.getLogger("setr")

# Lightning and library warnings that say nothing actionable for this project's runs (extras.ignore_warnings)
QUIET_WARNINGS = (
    ".*does not have many workers.*",
    ".*The number of training batches.*",
    ".*find_unused_parameters.*",
    ".*torch.cuda.amp.*",
    ".*`isinstance\\(treespec, LeafSpec\\)`.*",
    ".*Experiment logs directory .* exists and is not empty.*",
    ".*Checkpoint directory .* exists and is not empty.*",
    ".*sync_dist=True.*when logging on epoch level in distributed.*",  # val scores: torchmetrics syncs them
)


def check_config(cfg: DictConfig, data: bool = False) -> None:
    """Catch the config mistakes that need nothing built, before the config is printed or anything heavy runs;
    each raises one clear line naming the key. In order: a missing group, a ``+key`` that nothing reads, a
    mandatory ``???`` key left unset, the learning rate, interpolations, the typed table of
    :mod:`setr.utils.schema`. ``data``: the task reads the dataset (train, eval): its name is registered and
    ``data.root`` exists (a file listing is not needed for that)."""
    from setr.utils.schema import check_added_keys, check_types, first_missing, missing_line

    for key in ("data", "model"):
        if key not in cfg or cfg[key] is None:
            raise SETRConfigError(f"{key}: missing config group; pick one with {key}=<name>")
    check_added_keys(cfg)
    missing = first_missing(cfg)
    if missing:
        raise SETRConfigError(missing_line(missing))
    if "optimizer" in cfg:
        lr = cfg.optimizer.get("lr")
        if not isinstance(lr, (int, float)) or isinstance(lr, bool) or not math.isfinite(lr) or lr <= 0:
            raise SETRConfigError(f"optimizer.lr: must be a positive number, got {lr!r}")
    try:
        OmegaConf.to_container(cfg.data, resolve=True)
        OmegaConf.to_container(cfg.model, resolve=True)
    except Exception as e:
        raise SETRConfigError(f"config: {str(e).splitlines()[0]}") from e
    check_types(cfg)
    if data:
        check_data_source(cfg.data)


def check_data_source(data: DictConfig) -> None:
    """What a data config names on disk, without listing a file: ``data.name`` is a registered dataset,
    ``data.check`` a check level, ``data.root`` (when set) an existing folder."""
    from pathlib import Path

    from setr.data.check import check_level
    from setr.data.layout import README_HINT
    from setr.data.registry import DATASETS
    from setr.errors import DataError

    name = data.get("name")
    dataset = DATASETS.lookup(name, "data.name")
    check_level(data.get("check", "quick"))
    root = data.get("root")
    if root is not None and not Path(str(root)).expanduser().is_dir():
        # the layout line of the dataset's module, as its own check (setr.data.layout.resolve_root) words it
        layout = getattr(sys.modules.get(dataset.__module__), "LAYOUT", None)
        expects = f"data={name} expects {layout} under it" if isinstance(layout, str) else f"the folder of data={name}"
        raise DataError(f"{Path(str(root)).expanduser()}: dataset root not found; set data.root ({expects}; "
                        f"{README_HINT})")


def check_pretrained(cfg: DictConfig) -> None:
    """``model.encoder.pretrained`` of a training run: ``none`` / ``null`` (any case) becomes None (training from
    scratch, said in one log line); a file must exist and match the torch-hub hash in its name, else one error line
    naming the file, the key and where the paper's file comes from. src/train.py runs it before any data or model
    is built, when it fits (the weights are read at the start of fit); summary, eval, predict never need the file."""
    from setr.models.pretrained import KEY, check_pretrained_file

    encoder = cfg.model.get("encoder")
    if not isinstance(encoder, DictConfig) or "pretrained" not in encoder:
        return
    value = encoder.pretrained
    path = check_pretrained_file(value, encoder=encoder.get("name"))
    if path is None:
        if value is not None:
            encoder.pretrained = None  # `none` as a string: what SETRModule and build_setr read is None
        log.info("%s=none: the encoder (%s) starts from random weights, no ImageNet pre-training", KEY,
                 encoder.get("name"))


def extras(cfg: DictConfig, print_tree: bool = True) -> None:
    """``extras``: quiet Lightning's duplicate console handler, filter known warnings, print the config tree
    (``print_tree=False``: the caller prints it later with :func:`show_config`, after checks that need more)."""
    ex = cfg.get("extras") or {}
    # Lightning prints through its own console handler; Hydra's root handlers already show (and file) it
    for name in ("lightning.pytorch", "lightning.fabric"):
        lg = logging.getLogger(name)
        for h in list(lg.handlers):
            if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler):
                lg.removeHandler(h)
    if ex.get("ignore_warnings"):
        for pattern in QUIET_WARNINGS:
            warnings.filterwarnings("ignore", message=pattern)
    if print_tree:
        show_config(cfg)


def show_config(cfg: DictConfig) -> None:
    """The config tree on rank 0, when ``extras.print_config`` is on."""
    if (cfg.get("extras") or {}).get("print_config") and is_rank_zero():
        print_config(cfg)


def print_config(cfg: DictConfig) -> None:
    from rich import print as rprint
    from rich.tree import Tree

    tree = Tree("config", guide_style="dim")
    order = ["data", "model", "optimizer", "trainer", "callbacks", "logger", "paths"]
    for key in order + [k for k in cfg if k not in order]:
        if key not in cfg:
            continue
        value = cfg[key]
        text = OmegaConf.to_yaml(value, resolve=False) if isinstance(value, DictConfig) else str(value)
        tree.add(f"[bold]{key}[/bold]").add(text.rstrip())
    rprint(tree)


def instantiate_group(cfg: Mapping | None, group: str) -> list[Any]:
    """Instantiate each ``_target_`` node of a group (callbacks, logger), naming the entry on failure."""
    from hydra.utils import instantiate

    objs = []
    for name, node in (cfg or {}).items():
        if isinstance(node, Mapping) and "_target_" in node:
            try:
                objs.append(instantiate(node))
            except Exception as e:
                cause = e.__cause__ or e
                raise SETRConfigError(f"{group}.{name}: {str(cause).splitlines()[0]}") from e
    return objs


def cpu_only(trainer_cfg: Mapping) -> bool:
    acc = str(trainer_cfg.get("accelerator", "auto"))
    return acc == "cpu" or (acc == "auto" and not torch.cuda.is_available())


def instantiate_trainer(trainer_cfg: Mapping, **kwargs: Any) -> Any:
    """``lightning.Trainer`` from the ``trainer`` node; Lightning's own argument errors become one line."""
    from hydra.utils import instantiate

    try:
        return instantiate(dict(trainer_cfg), **kwargs, _convert_="all")
    except Exception as e:
        cause = e.__cause__ or e
        raise SETRConfigError(f"trainer: {str(cause).splitlines()[0]}") from e
