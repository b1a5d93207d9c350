"""Inference modes, kept apart from the model: whole image, sliding window, multi-scale + flip.

``infer(model, images, cfg, out_size)`` returns logits ``(B, C, *out_size)``; validation, ``eval.py`` and
``predict.py`` all go through it. ``cfg`` is the ``data.inference`` node:

* ``mode``: ``whole`` (one forward of the full image) or ``slide`` (windows of ``crop_size`` every ``stride``
  pixels, ``batch_size`` windows per forward, overlapping logits averaged; images smaller than the crop are
  padded and cropped back — mmsegmentation's ``slide_inference``);
* ``scales`` (ratios of the input size, default ``[1.0]``) and ``flip``: multi-scale + horizontal-flip testing;
  the logits of every scale/flip are resized to ``out_size`` and averaged.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F

from setr.errors import SETRConfigError

MODES = ("whole", "slide")


def _pair(v, key: str) -> tuple[int, int]:
    if isinstance(v, int):
        v = (v, v)
    try:
        v = tuple(int(x) for x in v)
    except TypeError as e:
        raise SETRConfigError(f"data.inference.{key}: expected a size or (height, width), got {v!r}") from e
    if len(v) != 2 or min(v) < 1:
        raise SETRConfigError(f"data.inference.{key}: expected positive sizes, got {v!r}")
    return v


def slide(model, images: torch.Tensor, crop_size, stride, batch_size: int = 1) -> torch.Tensor:
    """Sliding-window logits at the input size (mmseg grid: ``max(h - crop + stride - 1, 0) // stride + 1``)."""
    ch, cw = _pair(crop_size, "crop_size")
    sh, sw = _pair(stride, "stride")
    b, _, h, w = images.shape
    pad_h, pad_w = max(ch - h, 0), max(cw - w, 0)
    if pad_h or pad_w:
        images = F.pad(images, (0, pad_w, 0, pad_h))
    H, W = images.shape[-2:]
    rows = max(H - ch + sh - 1, 0) // sh + 1
    cols = max(W - cw + sw - 1, 0) // sw + 1
    boxes = []
    for r in range(rows):
        for c in range(cols):
            y1, x1 = min(r * sh, max(H - ch, 0)), min(c * sw, max(W - cw, 0))
            boxes.append((y1, x1, min(y1 + ch, H), min(x1 + cw, W)))
    logits = None
    count = images.new_zeros((1, 1, H, W))
    for i in range(0, len(boxes), max(1, int(batch_size))):
        chunk = boxes[i : i + max(1, int(batch_size))]
        crops = torch.cat([images[:, :, y1:y2, x1:x2] for y1, x1, y2, x2 in chunk])
        out = model(crops)
        if logits is None:
            logits = images.new_zeros((b, out.shape[1], H, W))
        for k, (y1, x1, y2, x2) in enumerate(chunk):
            logits[:, :, y1:y2, x1:x2] += out[k * b : (k + 1) * b]
            count[:, :, y1:y2, x1:x2] += 1
    return (logits / count)[..., :h, :w]


@torch.no_grad()
def infer(model: torch.nn.Module, images: torch.Tensor, cfg: Mapping | None = None,
          out_size: Sequence[int] | None = None) -> torch.Tensor:
    cfg = dict(cfg or {})
    mode = cfg.get("mode", "whole")
    if mode not in MODES:
        raise SETRConfigError(f"data.inference.mode: unknown mode {mode!r}; choose one of {', '.join(MODES)}")
    scales = [float(s) for s in (cfg.get("scales") or [1.0])]
    if min(scales) <= 0:
        raise SETRConfigError(f"data.inference.scales: ratios must be > 0, got {scales}")
    flips = [False, True] if cfg.get("flip") else [False]
    if mode == "slide":
        for key in ("crop_size", "stride"):
            if cfg.get(key) is None:
                raise SETRConfigError(f"data.inference.{key}: required by mode 'slide'")
    h, w = images.shape[-2:]
    target = tuple(out_size) if out_size is not None else (h, w)
    total = None
    for s in scales:
        x = images if s == 1.0 else F.interpolate(
            images, size=(max(1, int(h * s + 0.5)), max(1, int(w * s + 0.5))), mode="bilinear", align_corners=False)
        for flip in flips:
            xi = x.flip(-1) if flip else x
            if mode == "slide":
                lg = slide(model, xi, cfg["crop_size"], cfg["stride"], int(cfg.get("batch_size", 1) or 1))
            else:
                lg = model(xi)
            if flip:
                lg = lg.flip(-1)
            if tuple(lg.shape[-2:]) != target:
                lg = F.interpolate(lg, size=target, mode="bilinear", align_corners=False)
            total = lg if total is None else total + lg
    return total / (len(scales) * len(flips))
