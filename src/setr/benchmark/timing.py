"""Timed calls and what the rounds add up to: every measure's min and median over rounds for each variant, and
the ratio of the medians (oriented so that > 1 always means the setting is better)."""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch

# (name, label in the table, higher is better)
MEASURES: tuple[tuple[str, str, bool], ...] = (
    ("train_steps_per_s", "train steps/s", True),
    ("train_images_per_s", "train images/s", True),
    ("train_peak_mem_mb", "train peak memory (MB)", False),
    ("whole_images_per_s", "inference whole, images/s", True),
    ("slide_images_per_s", "inference slide, images/s", True),
    ("ms_flip_images_per_s", "inference multi-scale + flip, images/s", True),
    ("data_images_per_s_per_worker", "data pipeline, images/s per worker", True),
    ("workers_per_gpu", "data workers per GPU to keep up", False),
    ("mfu", "model FLOPs utilisation", True),
)


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA runs asynchronously: a clock read without it times the launch)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], None], steps: int, device: torch.device) -> float:
    """Seconds per call of ``fn`` over ``steps`` calls (device synchronised before and after)."""
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    sync(device)
    return (time.perf_counter() - t0) / steps


def warm_up(fns: Iterable[Callable[[], None]], steps: int, device: torch.device) -> None:
    """``steps`` calls of each of ``fns`` before anything is timed: ``torch.compile`` compiles, cuDNN and the
    allocator settle, lazy imports happen."""
    for fn in fns:
        for _ in range(steps):
            fn()
    sync(device)


def stats(values: Sequence[float]) -> dict[str, float | None]:
    """``min`` and ``median`` of the finite values (None for both when there are none: a measure not run)."""
    vals = [float(x) for x in values if x is not None and math.isfinite(x)]
    if not vals:
        return {"min": None, "median": None}
    return {"min": min(vals), "median": statistics.median(vals)}


def measures_of(setting: Mapping[str, Sequence[float]],
                baseline: Mapping[str, Sequence[float]]) -> dict[str, dict[str, Any]]:
    """``{name: {"setting": stats, "baseline": stats, "ratio"}}`` for every measure of :data:`MEASURES`, from
    each variant's values per round. ``ratio``: setting median / baseline median where higher is better,
    baseline / setting where lower is (memory, workers); None when either median is missing or zero."""
    out = {}
    for name, _, higher in MEASURES:
        s, b = stats(setting.get(name, [])), stats(baseline.get(name, []))
        ratio = None
        if s["median"] and b["median"]:
            ratio = s["median"] / b["median"] if higher else b["median"] / s["median"]
        out[name] = {"setting": s, "baseline": b, "ratio": ratio}
    return out
