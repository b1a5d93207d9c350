"""Inference throughput of one image through :func:`setr.inference.infer`: ``whole`` (one forward),
``slide`` (sliding windows, ``data.inference.batch_size`` windows per forward) and ``ms_flip`` (the official
multi-scale + flip protocol in the data config's mode)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from setr.benchmark.timing import timed
from setr.benchmark.variant import Variant, autocast
from setr.values import size_pair

MODES = ("whole", "slide", "ms_flip")


def windows_per_forward(v: Variant, size: tuple[int, int], crop: tuple[int, int], stride: Any,
                        device: torch.device) -> int:
    """The windows per forward the slide measure of ``v`` runs (``auto`` resolved as :func:`setr.inference.slide`
    does for an image of ``size``: the mmseg grid's window count, capped by :func:`setr.inference.auto_windows`)."""
    if v.slide_batch_size != "auto":
        return int(v.slide_batch_size)
    from setr.inference import auto_windows

    sh, sw = size_pair(stride, "data.inference.stride")
    h, w = max(size[0], crop[0]), max(size[1], crop[1])
    n = (max(h - crop[0] + sh - 1, 0) // sh + 1) * (max(w - crop[1] + sw - 1, 0) // sw + 1)
    return auto_windows(v.module.model, torch.empty(1, 3, *size, device=device), crop, n)


def inference_configs(v: Variant, size: tuple[int, int], device: torch.device) -> dict[str, dict[str, Any]]:
    """The ``data.inference`` config of each mode for ``v`` (sets ``v.windows``): the slide window and stride of
    ``data.inference`` (default: the crop and 2/3 of it); multi-scale + flip with ``data.ms_ratios``,
    ``test_scale`` and ``ms_min_short``, probabilities averaged, in the data config's mode."""
    data = v.data
    inf = dict(data.get("inference") or {})
    crop = inf.get("crop_size") or data["crop_size"]
    ch, cw = size_pair(crop, "data.inference.crop_size")
    stride = inf.get("stride") or [max(1, ch * 2 // 3), max(1, cw * 2 // 3)]
    slide_cfg = {"mode": "slide", "crop_size": [ch, cw], "stride": stride, "batch_size": v.slide_batch_size}
    v.windows = windows_per_forward(v, size, (ch, cw), stride, device)
    base = slide_cfg if inf.get("mode", "whole") == "slide" else {"mode": "whole"}
    ms_cfg = {**base, "scales": list(data.get("ms_ratios") or [1.0]), "flip": True, "average": "probs",
              "img_scale": data.get("test_scale"), "min_short": data.get("ms_min_short")}
    if ms_cfg["img_scale"] is None:
        ms_cfg.pop("min_short")
    return {"whole": {"mode": "whole"}, "slide": slide_cfg, "ms_flip": ms_cfg}


def inference_fns(v: Variant, device: torch.device, size: tuple[int, int]) -> dict[str, Callable[[], None]]:
    """``whole`` / ``slide`` / ``ms_flip``: one random image of ``size`` through :func:`setr.inference.infer`
    with the built ``v`` (in eval mode, under its precision's autocast) each."""
    from setr.inference import infer

    x = torch.randn(1, 3, *size, generator=torch.Generator().manual_seed(1)).to(device)
    if v.precision == "bf16-true":
        x = x.to(torch.bfloat16)
    module = v.module

    def run(cfg: Mapping[str, Any]) -> Callable[[], None]:
        def go() -> None:
            module.eval()
            with autocast(v, device):
                infer(module, x, cfg)

        return go

    return {mode: run(cfg) for mode, cfg in inference_configs(v, size, device).items()}


def inference_round(v: Variant, fns: Mapping[str, Callable[[], None]], steps: int, device: torch.device) -> None:
    """Time ``steps`` images of each mode in ``fns`` and append ``<mode>_images_per_s`` to ``v.results``."""
    for mode in MODES:
        if mode in fns:
            v.results.setdefault(f"{mode}_images_per_s", []).append(1 / timed(fns[mode], steps, device))
