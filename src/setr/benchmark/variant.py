"""One side of the comparison: the **setting** (the composed config as given) or the **baseline** (a copy with
``bench.baseline`` merged on top), resolved from the config and built on a device with random weights."""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass, field
from typing import Any

import torch

from setr.errors import SETRConfigError

PRECISIONS = ("32-true", "bf16-mixed", "16-mixed", "bf16-true")


def precision_of(value: Any) -> str:
    """Lightning's precision names: ``32-true``, ``bf16-mixed``, ``16-mixed``, ``bf16-true`` (and short forms)."""
    p = str(value)
    aliases = {"32": "32-true", "bf16": "bf16-mixed", "16": "16-mixed", "16-true": "16-mixed"}
    p = aliases.get(p, p)
    if p not in PRECISIONS:
        raise SETRConfigError(f"trainer.precision: the benchmark runs 32-true, bf16-mixed, 16-mixed or bf16-true, "
                              f"got {value!r}")
    return p


@dataclass
class Variant:
    """One side of the comparison, resolved from a composed config (:func:`variant_of`) and then built
    (:func:`build_variant`); ``results`` collects each measure's value of every round."""

    name: str
    precision: str
    model_cfg: dict[str, Any]  # for build_setr: `compile` removed (SETRModule's argument), random weights
    fused_attn: bool | None  # what the built encoder's attention uses (None until built)
    grad_checkpointing: Any
    compile: bool
    data: dict[str, Any]
    optimizer: dict[str, Any]
    slide_batch_size: int | str = 1  # an int or auto
    windows: int | None = None  # windows per forward the slide measure ran (auto resolved)
    peak: float | None = None  # dense peak TFLOP/s for MFU
    module: Any = None
    optim: Any = None
    sched: Any = None
    scaler: Any = None
    results: dict[str, list[float]] = field(default_factory=dict)

    def describe(self) -> dict[str, Any]:
        """What the variant ran, as the JSON line's ``setting`` / ``baseline`` (resize and channels-last read from
        the built model, so the defaults are not written down twice)."""
        return {"precision": self.precision, "fused_attn": self.fused_attn,
                "grad_checkpointing": self.grad_checkpointing, "compile": self.compile,
                "resize": self.module.model.resize, "channels_last": self.module.model.channels_last,
                "slide_batch_size": self.slide_batch_size, "slide_windows_per_forward": self.windows}


def slide_batch_size(value: Any) -> int | str:
    """``data.inference.batch_size``: an int, or ``auto`` for null / ``auto`` (sized from the device by
    :func:`setr.inference.auto_windows`)."""
    from setr.inference import check_batch_size

    per = check_batch_size(value)
    return "auto" if per is None else per


def variant_of(cfg, name: str) -> Variant:
    """The :class:`Variant` of a composed config (``cfg`` itself for the setting, the baseline copy otherwise)."""
    from setr.nodes import plain

    model = dict(plain(cfg.model))
    model["num_classes"] = int(cfg.data.num_classes)
    enc = dict(model.get("encoder") or {})
    enc["pretrained"] = None  # random weights: speed does not depend on them, and no file is needed
    model["encoder"] = enc
    compile_ = model.pop("compile", None)  # SETRModule's argument, not build_setr's
    if compile_ is not None and not isinstance(compile_, bool):
        raise SETRConfigError(f"model.compile: expected true or false, got {compile_!r}")
    data = plain(cfg.data)
    return Variant(name=name, precision=precision_of(cfg.trainer.get("precision", "32-true")), model_cfg=model,
                   fused_attn=None, grad_checkpointing=enc.get("grad_checkpointing", False),
                   compile=bool(compile_), data=data,
                   optimizer=plain(cfg.get("optimizer")) or {"name": "sgd", "lr": 0.01},
                   slide_batch_size=slide_batch_size((data.get("inference") or {}).get("batch_size")))


def baseline_config(cfg):
    """A copy of ``cfg`` with ``bench.baseline`` merged on top. Struct mode is off on the copy: the baseline may
    set keys the chosen data or model config leaves out (``data.inference.batch_size`` on most datasets)."""
    from omegaconf import OmegaConf

    base = copy.deepcopy(cfg)
    OmegaConf.set_struct(base, False)
    overrides = cfg.bench.get("baseline") or {}
    return OmegaConf.merge(base, overrides)


def build_variant(v: Variant, device: torch.device, total_steps: int) -> None:
    """The Lightning module (``torch.compile`` as ``model.compile`` says), optimizer, schedule and grad scaler of
    ``v``, on ``device``; ``v.fused_attn`` is read back from the built encoder."""
    from setr.checkpoint import ModelRecord
    from setr.training import SETRModule
    from setr.training.optim import build_optimizer, build_scheduler

    n = v.model_cfg["num_classes"]
    record = ModelRecord(model=v.model_cfg, class_names=[f"class_{i}" for i in range(n)], palette=[],
                         mean=v.data.get("mean", [0.0, 0.0, 0.0]), std=v.data.get("std", [1.0, 1.0, 1.0]),
                         ignore_index=v.data.get("ignore_index", 255), crop_size=v.data["crop_size"],
                         inference=v.data.get("inference") or {"mode": "whole"})
    module = SETRModule(record=record, optimizer=v.optimizer, compile=v.compile)
    v.fused_attn = module.model.encoder.fused_attn
    module.to(device)
    if v.precision == "bf16-true":
        module.to(torch.bfloat16)
    v.module = module
    v.optim = build_optimizer(module.model, v.optimizer)
    sched = dict(v.optimizer.get("scheduler") or {})
    sched.pop("total_steps", None)
    v.sched = build_scheduler(v.optim, sched, total_steps)
    v.scaler = torch.amp.GradScaler(device.type) if v.precision == "16-mixed" else None


def autocast(v: Variant, device: torch.device):
    """The autocast context of ``v``'s precision (none for ``32-true`` and ``bf16-true``)."""
    if v.precision == "bf16-mixed":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    if v.precision == "16-mixed":
        return torch.autocast(device.type, dtype=torch.float16)
    return contextlib.nullcontext()

