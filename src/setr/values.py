"""Small value checks and constants every floor uses, in one place.

A config size, a positive count and a device name are read the same way by training, evaluation, prediction,
export and the benchmark, so a mistake reads the same everywhere: one :class:`setr.errors.SETRConfigError` line
that starts with the config key. This module sits on the ground floor (it imports only :mod:`setr.errors` and
third-party packages), so any module may use it without an import running back up.
"""

from __future__ import annotations

from typing import Any

import torch

from setr.errors import SETRConfigError

# the label value that is never scored: every dataset writes it for "no class", the crop padding fills with it, and
# the loss and metrics skip it (mmsegmentation's ignore_index)
IGNORE_INDEX = 255

# ImageNet normalisation in 0..255 pixel units (mmsegmentation's img_norm_cfg, which the ViT weights were trained
# with): the default mean / std a checkpoint record falls back to when it names none
IMAGENET_MEAN_255 = (123.675, 116.28, 103.53)
IMAGENET_STD_255 = (58.395, 57.12, 57.375)


def size_pair(value: Any, key: str) -> tuple[int, int]:
    """An int or ``[height, width]`` config value as a positive ``(height, width)``; one line naming ``key`` else
    (``key`` is the whole config path, e.g. ``data.inference.crop_size``)."""
    if isinstance(value, int) and not isinstance(value, bool):
        value = (value, value)
    try:
        h, w = (int(v) for v in value)
    except (TypeError, ValueError):
        raise SETRConfigError(f"{key}: expected a size or [height, width], got {value!r}") from None
    if h <= 0 or w <= 0:
        raise SETRConfigError(f"{key}: sizes must be positive, got {value!r}")
    return h, w


def positive_int(value: Any, key: str, minimum: int = 1) -> int:
    """``value`` when it is an integer ``>= minimum`` (a bool is not a count); one line naming ``key`` else."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise SETRConfigError(f"{key}: expected an integer >= {minimum}, got {value!r}")
    return value


def resolve_device(name: Any = "auto", key: str = "device") -> torch.device:
    """``auto`` (or null) -> ``cuda`` when a GPU is available, else ``cpu``; ``cpu``, ``cuda`` and ``cuda:N`` as
    given. Anything else, or a GPU that is not there, is one line naming ``key``: a run asked for a GPU must not
    quietly measure or predict on the CPU."""
    text = str(name or "auto").strip().lower()
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(text)
    except (RuntimeError, ValueError) as e:
        raise SETRConfigError(f"{key}: unknown device {name!r}; use auto, cpu, cuda or cuda:N") from e
    if dev.type not in ("cpu", "cuda"):
        raise SETRConfigError(f"{key}: unsupported device {name!r}; use auto, cpu, cuda or cuda:N")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise SETRConfigError(f"{key}: {name} requested but no CUDA GPU is available; use {key}=auto or cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise SETRConfigError(f"{key}: {name} requested but only {torch.cuda.device_count()} GPU(s) exist")
    return dev
