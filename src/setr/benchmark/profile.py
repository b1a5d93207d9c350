"""``bench.profile``: the operators and kernels with the most self time in a training step
(:mod:`torch.profiler`), and their table."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from setr.benchmark.timing import sync


def profile_train(step: Callable[[], None], steps: int, device: torch.device, rows: int,
                  step_ms: float) -> list[dict[str, Any]]:
    """The ``rows`` operators and kernels with the most self time (device time on CUDA, CPU time otherwise) over
    ``steps`` training steps under :mod:`torch.profiler`, as ``{"name", "self_ms", "share", "calls"}``:
    ``self_ms`` per step, ``share`` of ``step_ms`` (the measured step time; on CUDA an operator and the kernels
    it launched are both listed, so shares do not add up to 1)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sync(device)
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        sync(device)
    events = prof.key_averages()

    def self_us(e: Any) -> float:
        return float(e.self_device_time_total if device.type == "cuda" else e.self_cpu_time_total)

    top = sorted(events, key=self_us, reverse=True)[:rows]
    return [{"name": e.key, "self_ms": self_us(e) / 1e3 / steps, "share": self_us(e) / 1e3 / steps / step_ms,
             "calls": int(e.count) // steps} for e in top if self_us(e) > 0]


def render_profile(rows: Sequence[Mapping[str, Any]], title: str):
    """The rich table of :func:`profile_train`'s rows."""
    from rich.table import Table

    table = Table(title=title)
    for h in ("operator", "self ms / step", "share of the step", "calls / step"):
        table.add_column(h, justify="left" if h == "operator" else "right")
    for r in rows:
        table.add_row(r["name"][:70], f"{r['self_ms']:.2f}", f"{100 * r['share']:.1f} %", str(r["calls"]))
    return table
