"""Optimizer parameter groups and the poly learning-rate schedule of the SETR recipes."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from setr.errors import SETRConfigError

NO_DECAY_NAMES = ("pos_embed", "cls_token", "dist_token", "reg_token")


def param_groups(model: nn.Module, lr: float, weight_decay: float, head_lr_mult: float = 1.0,
                 no_decay_norm_bias_pos: bool = True) -> list[dict[str, Any]]:
    """Split parameters into (head / not head) x (decay / no decay) groups.

    "Head" means the parameter name contains ``head`` (decode_head.*, auxiliary_heads.*), as the recipes'
    ``custom_keys={'head': lr_mult=10}``: the MLA neck trains at the base LR. No weight decay on norms, biases,
    position embeddings and prefix tokens when ``no_decay_norm_bias_pos``. Each group carries ``lr_mult`` so the
    scheduler scales every group from the base LR.
    """
    groups: dict[tuple[bool, bool], list[torch.nn.Parameter]] = {}
    norm_params = {id(p) for m in model.modules()
                   if isinstance(m, (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm))
                   for p in m.parameters(recurse=False)}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        is_head = "head" in name
        no_decay = no_decay_norm_bias_pos and (
            p.ndim <= 1 or id(p) in norm_params or name.endswith(".bias") or any(n in name for n in NO_DECAY_NAMES)
        )
        groups.setdefault((is_head, no_decay), []).append(p)
    out = []
    for (is_head, no_decay), params in sorted(groups.items()):
        mult = head_lr_mult if is_head else 1.0
        out.append({
            "params": params,
            "lr": lr * mult,
            "lr_mult": mult,
            "weight_decay": 0.0 if no_decay else weight_decay,
            "name": f"{'head' if is_head else 'backbone'}{'_no_decay' if no_decay else ''}",
        })
    return out


def build_optimizer(model: nn.Module, cfg: Mapping) -> torch.optim.Optimizer:
    cfg = dict(cfg)
    name = cfg.get("name", "sgd")
    lr = float(cfg.get("lr", 0.01))
    if not lr > 0:
        raise SETRConfigError(f"optimizer.lr: must be > 0, got {lr}")
    wd = float(cfg.get("weight_decay", 0.0))
    if wd < 0:
        raise SETRConfigError(f"optimizer.weight_decay: must be >= 0, got {wd}")
    mult = float(cfg.get("head_lr_mult", 1.0))
    if not mult > 0:
        raise SETRConfigError(f"optimizer.head_lr_mult: must be > 0, got {mult}")
    groups = param_groups(model, lr, wd, mult, bool(cfg.get("no_decay_norm_bias_pos", True)))
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=float(cfg.get("momentum", 0.9)), weight_decay=wd)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=tuple(cfg.get("betas", (0.9, 0.999))), weight_decay=wd)
    raise SETRConfigError(f"optimizer.name: unknown optimizer {name!r}; choose sgd or adamw")


def poly_factor(step: int, total: int, power: float, base_lr: float, min_lr: float,
                warmup_steps: int = 0, warmup_ratio: float = 1e-6) -> float:
    """Multiplier of ``base_lr`` at ``step``: mmcv's poly ``(base - min) * (1 - step/total)^power + min`` after a
    linear warmup from ``base * warmup_ratio``."""
    step = min(step, total)
    lr = (base_lr - min_lr) * (1 - step / max(total, 1)) ** power + min_lr
    if warmup_steps and step < warmup_steps:
        k = (1 - step / warmup_steps) * (1 - warmup_ratio)
        lr = lr * (1 - k)
    return lr / base_lr


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: Mapping, total_steps: int, base_lr: float):
    cfg = dict(cfg or {})
    name = cfg.get("name", "poly")
    warmup = int(cfg.get("warmup_steps", 0))
    ratio = float(cfg.get("warmup_ratio", 1e-6))
    if name == "poly":
        power, min_lr = float(cfg.get("power", 0.9)), float(cfg.get("min_lr", 1e-4))
        if min_lr >= base_lr:
            min_lr = 0.0  # a min_lr above the base LR (tiny LRs in sweeps) would make the schedule grow
        fn = lambda step: poly_factor(step, total_steps, power, base_lr, min_lr, warmup, ratio)  # noqa: E731
    elif name == "constant":
        fn = lambda step: poly_factor(step, total_steps, 0.0, base_lr, 0.0, warmup, ratio)  # noqa: E731
    else:
        raise SETRConfigError(f"optimizer.scheduler.name: unknown schedule {name!r}; choose poly or constant")
    return torch.optim.lr_scheduler.LambdaLR(optimizer, fn)
