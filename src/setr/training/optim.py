"""Optimizer parameter groups and the poly learning-rate schedule of the SETR recipes."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from setr.errors import SETRConfigError

NO_DECAY_NAMES = ("pos_embed", "cls_token", "dist_token", "reg_token")


def encoder_layer_id(name: str, depth: int) -> int:
    """Layer of a SETR parameter for layer-wise LR decay (BEiT / mmseg's ``LayerDecayOptimizerConstructor``):
    the patch embedding, position embedding and prefix tokens are layer 0, ViT block ``i`` is layer ``i + 1``,
    everything after the encoder (MLA neck, heads) is layer ``depth + 1``."""
    if name.startswith("encoder.vit."):
        rest = name[len("encoder.vit."):]
        if rest.startswith("blocks."):
            return int(rest.split(".")[1]) + 1
        if rest.startswith(("patch_embed.", "pos_embed", "cls_token", "dist_token", "reg_token")):
            return 0
    return depth + 1


def param_groups(model: nn.Module, lr: float, weight_decay: float, head_lr_mult: float = 1.0,
                 no_decay_norm_bias_pos: bool = True, layer_decay: float | None = None) -> list[dict[str, Any]]:
    """Split parameters into (head / not head) x (decay / no decay) [x encoder layer] groups.

    "Head" means the parameter name contains ``head`` (decode_head.*, auxiliary_heads.*), as the recipes'
    ``custom_keys={'head': lr_mult=10}``: the MLA neck trains at the base LR. No weight decay on norms, biases,
    position embeddings and prefix tokens when ``no_decay_norm_bias_pos``. With ``layer_decay`` (e.g. 0.9) the
    encoder's layers get ``layer_decay ** (depth + 1 - layer)`` of the LR (:func:`encoder_layer_id`): the last
    block 0.9, the patch embedding 0.9 ** (depth + 1), neck and heads 1. Frozen parameters (``requires_grad``
    False, e.g. ``model.encoder.freeze``) are left out. Each group starts at ``lr * lr_mult`` (``lr_mult`` is kept
    for the record); :func:`build_scheduler` decays every group from there to ``min_lr``.
    """
    depth = len(getattr(getattr(getattr(model, "encoder", None), "vit", None), "blocks", ()))
    groups: dict[tuple[bool, bool, int], list[torch.nn.Parameter]] = {}
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
        layer = encoder_layer_id(name, depth) if layer_decay is not None else depth + 1
        groups.setdefault((is_head, no_decay, layer), []).append(p)
    out = []
    for (is_head, no_decay, layer), params in sorted(groups.items()):
        mult = (head_lr_mult if is_head else 1.0) * (layer_decay ** (depth + 1 - layer) if layer_decay else 1.0)
        out.append({
            "params": params,
            "lr": lr * mult,
            "lr_mult": mult,
            "weight_decay": 0.0 if no_decay else weight_decay,
            "name": f"{'head' if is_head else 'backbone'}{'_no_decay' if no_decay else ''}"
                    + (f"_layer{layer}" if layer_decay is not None and layer <= depth else ""),
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
    layer_decay = cfg.get("layer_decay")
    if layer_decay is not None and (isinstance(layer_decay, bool) or not 0 < float(layer_decay) <= 1):
        raise SETRConfigError(f"optimizer.layer_decay: must be in (0, 1] or null, got {layer_decay!r}")
    groups = param_groups(model, lr, wd, mult, bool(cfg.get("no_decay_norm_bias_pos", True)),
                          None if layer_decay is None else float(layer_decay))
    if not groups:
        raise SETRConfigError("model.encoder.freeze: nothing left to train (every parameter is frozen)")
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=float(cfg.get("momentum", 0.9)), weight_decay=wd)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=tuple(cfg.get("betas", (0.9, 0.999))), weight_decay=wd)
    raise SETRConfigError(f"optimizer.name: unknown optimizer {name!r}; choose sgd or adamw")


def poly_factor(step: int, total: int, power: float, base_lr: float, min_lr: float,
                warmup_steps: int = 0, warmup_ratio: float = 1e-6) -> float:
    """Multiplier of ``base_lr`` at ``step``: mmcv's poly ``(base - min) * (1 - step/total)^power + min`` after a
    linear warmup from ``base * warmup_ratio``. ``base_lr`` is ONE group's base LR: the offset ``min_lr`` is
    absolute, so a factor computed for one group is wrong for a group with another base LR."""
    step = min(step, total)
    lr = (base_lr - min_lr) * (1 - step / max(total, 1)) ** power + min_lr
    if warmup_steps and step < warmup_steps:
        k = (1 - step / warmup_steps) * (1 - warmup_ratio)
        lr = lr * (1 - k)
    return lr / base_lr


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: Mapping, total_steps: int,
                    base_lr: float | None = None) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-step LR schedule: ``poly`` (the recipes') or ``constant``, each after an optional linear warmup.

    Every parameter group gets its own lambda, because mmcv's ``PolyLrUpdaterHook`` and mmengine's ``PolyLR``
    decay each group from its own base LR (``lr * lr_mult``, what :func:`param_groups` put in ``lr``) to the
    same ``min_lr``: one shared factor would floor the x10 head groups at 10 x ``min_lr``. ``base_lr`` (the
    optimizer's LR before multipliers) is not needed for that and is accepted for callers that pass it.

    A group whose base LR is not above ``min_lr`` (tiny LRs in sweeps) decays to 0 instead: with ``min_lr`` as
    its floor its LR would grow. The other groups keep ``min_lr``.
    """
    del base_lr  # each group's own LR is its base
    cfg = dict(cfg or {})
    name = cfg.get("name", "poly")
    warmup = int(cfg.get("warmup_steps", 0))
    ratio = float(cfg.get("warmup_ratio", 1e-6))
    if name == "poly":
        power, min_lr = float(cfg.get("power", 0.9)), float(cfg.get("min_lr", 1e-4))
    elif name == "constant":
        power, min_lr = 0.0, 0.0
    else:
        raise SETRConfigError(f"optimizer.scheduler.name: unknown schedule {name!r}; choose poly or constant")

    def group_lambda(base: float):
        if base <= 0:  # a frozen group (lr 0) stays at 0; its factor is irrelevant
            return lambda step: 1.0
        floor = min_lr if min_lr < base else 0.0
        return lambda step: poly_factor(step, total_steps, power, base, floor, warmup, ratio)

    # LambdaLR records each group's starting LR as ``initial_lr`` (kept on resume) and multiplies it by the lambda
    bases = [float(g.get("initial_lr", g["lr"])) for g in optimizer.param_groups]
    return torch.optim.lr_scheduler.LambdaLR(optimizer, [group_lambda(b) for b in bases])
