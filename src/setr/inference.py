"""Inference modes, kept apart from the model: whole image (more modes come with the inference issue).

``infer(model, images, cfg, out_size)`` returns logits ``(B, C, *out_size)``; validation, ``eval.py`` and
``predict.py`` all go through it. ``cfg`` is the ``data.inference`` node (``mode``, ...).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F

from setr.errors import SETRConfigError

MODES = ("whole",)


@torch.no_grad()
def infer(model: torch.nn.Module, images: torch.Tensor, cfg: Mapping | None = None,
          out_size: Sequence[int] | None = None) -> torch.Tensor:
    cfg = dict(cfg or {})
    mode = cfg.get("mode", "whole")
    if mode not in MODES:
        raise SETRConfigError(f"data.inference.mode: unknown mode {mode!r}; choose one of {', '.join(MODES)}")
    logits = model(images)
    if out_size is not None and tuple(logits.shape[-2:]) != tuple(out_size):
        logits = F.interpolate(logits, size=tuple(out_size), mode="bilinear", align_corners=False)
    return logits
