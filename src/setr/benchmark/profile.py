"""``bench.profile``: the operators and kernels with the most self time in a training step
(:mod:`torch.profiler`), their table, and how much of the step is matrix products and attention (the GEMM floor)
and how much is everything else (copies, resizing, norms, softmax, elementwise)."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch

from setr.benchmark.timing import sync

# Matrix products, convolutions and attention: CPU operators (their self time holds the oneDNN / BLAS call) and
# CUDA kernels (cuBLAS / cuDNN / CUTLASS / flash-attention names)
MATMUL = re.compile(
    r"^aten::(mm|addmm|bmm|baddbmm|addbmm|_addmm_activation|mkldnn_linear|mkldnn_convolution|convolution_backward"
    r"|_convolution|cudnn_convolution|mkldnn_matmul)$|scaled_dot_product|flash|fmha|efficient_attention|gemm"
    r"|cutlass|xmma|nvjet|cudnn|implicit_convolve|wgrad|dgrad|sm\d+_", re.IGNORECASE)


def is_matmul(name: str) -> bool:
    """True for an operator or kernel that is a matrix product, a convolution or attention (:data:`MATMUL`)."""
    return bool(MATMUL.search(name))


def split_of(times_ms: Iterable[tuple[str, float]], step_ms: float) -> dict[str, Any]:
    """(operator or kernel name, self time per step) pairs -> ``{"matmul_ms", "other_ms", "profiled_ms",
    "step_ms", "outside_share"}``: ``outside_share`` = other / (matmul + other), the share of the step's operator
    time that is not matrix products or attention (what a faster loss path, resize or norm can still take away)."""
    mm = other = 0.0
    for name, t in times_ms:
        if is_matmul(name):
            mm += t
        else:
            other += t
    total = mm + other
    return {"matmul_ms": mm, "other_ms": other, "profiled_ms": total, "step_ms": step_ms,
            "outside_share": other / total if total > 0 else None}


def profile_train(step: Callable[[], None], steps: int, device: torch.device, rows: int,
                  step_ms: float) -> dict[str, Any]:
    """The ``rows`` operators and kernels with the most self time (device time on CUDA, CPU time otherwise) over
    ``steps`` training steps under :mod:`torch.profiler`, as ``{"top": [{"name", "self_ms", "share", "calls"}],
    "split": split_of(...)}``: ``self_ms`` per step, ``share`` of ``step_ms`` (the measured step time; on CUDA an
    operator and the kernels it launched are both listed, so shares do not add up to 1). The split counts CPU
    operators on CPU and only kernels (device time) on CUDA, so nothing is counted twice."""
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
    return {"top": [{"name": e.key, "self_ms": self_us(e) / 1e3 / steps, "share": self_us(e) / 1e3 / steps / step_ms,
                     "calls": int(e.count) // steps} for e in top if self_us(e) > 0],
            "split": split_of(((e.key, self_us(e) / 1e3 / steps) for e in events), step_ms)}


def render_profile(profiled: Mapping[str, Any], title: str):
    """The rich table of :func:`profile_train`'s rows, its caption the split."""
    from rich.table import Table

    rows: Sequence[Mapping[str, Any]] = profiled["top"]
    sp = profiled["split"]
    caption = None
    if sp["outside_share"] is not None:
        caption = (f"matrix products, convolutions and attention: {sp['matmul_ms']:.1f} ms; everything else: "
                   f"{sp['other_ms']:.1f} ms ({100 * sp['outside_share']:.1f} % of the profiled "
                   f"{sp['profiled_ms']:.1f} ms; measured step {sp['step_ms']:.1f} ms)")
    table = Table(title=title, caption=caption)
    for h in ("operator", "self ms / step", "share of the step", "calls / step"):
        table.add_column(h, justify="left" if h == "operator" else "right")
    for r in rows:
        table.add_row(r["name"][:70], f"{r['self_ms']:.2f}", f"{100 * r['share']:.1f} %", str(r["calls"]))
    return table
