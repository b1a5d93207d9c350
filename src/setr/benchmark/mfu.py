"""Model FLOPs utilisation: the FLOPs of a training step per second over the GPU's dense peak for the precision.

The FLOPs are 3 x those of one training-mode forward (auxiliary heads included) of
:func:`setr.models.summary.count_flops`, counted on a meta model with attention through the math path, so they
are the same whatever kernel runs (fused attention included); gradient checkpointing's recomputation is not
counted (it is work the setting chose, not model FLOPs)."""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

import torch

# dense (no sparsity) peak TFLOP/s by GPU name fragment, tried in order: bf16/fp16 tensor cores, tf32, plain fp32
PEAK_TFLOPS: tuple[tuple[str, dict[str, float]], ...] = (
    ("B200", {"bf16": 2250.0, "tf32": 1100.0, "fp32": 80.0}),
    ("H200", {"bf16": 989.0, "tf32": 495.0, "fp32": 67.0}),
    ("H100 PCIe", {"bf16": 756.0, "tf32": 378.0, "fp32": 51.0}),
    ("H100 NVL", {"bf16": 835.0, "tf32": 418.0, "fp32": 60.0}),
    ("H100", {"bf16": 989.0, "tf32": 495.0, "fp32": 67.0}),  # SXM
    ("GH200", {"bf16": 989.0, "tf32": 495.0, "fp32": 67.0}),
    ("A100", {"bf16": 312.0, "tf32": 156.0, "fp32": 19.5}),
    ("L40S", {"bf16": 362.0, "tf32": 183.0, "fp32": 91.6}),
    ("L4", {"bf16": 121.0, "tf32": 60.0, "fp32": 30.3}),
    ("A10", {"bf16": 125.0, "tf32": 62.5, "fp32": 31.2}),
    ("V100", {"bf16": 125.0, "tf32": 15.7, "fp32": 15.7}),  # fp16 tensor cores; no bf16 / tf32
    ("T4", {"bf16": 65.0, "tf32": 8.1, "fp32": 8.1}),  # fp16 tensor cores
)


def peak_tflops(gpu: str | None, precision: str, override: float | None = None) -> float | None:
    """The GPU's dense peak TFLOP/s for ``precision`` (tf32 when fp32 matmuls may use it), ``override`` when
    given, or None for a GPU not in :data:`PEAK_TFLOPS` (or no GPU)."""
    if override is not None:
        return float(override)
    if gpu is None:
        return None
    for fragment, peaks in PEAK_TFLOPS:
        if fragment.lower() in gpu.lower():
            if precision != "32-true":
                return peaks["bf16"]
            tf32 = torch.backends.cuda.matmul.allow_tf32 or torch.get_float32_matmul_precision() != "highest"
            return peaks["tf32" if tf32 else "fp32"]
    return None


def train_flops_per_image(model_cfg: Mapping[str, Any], crop: tuple[int, int]) -> int:
    """3 x the FLOPs of one training-mode forward (auxiliary heads included) of one crop, counted on a meta
    model (attention via the math path, so counted whatever kernel runs)."""
    from setr.models.summary import build_meta_model, count_flops

    cfg = copy.deepcopy(dict(model_cfg))
    return 3 * count_flops(build_meta_model(cfg), crop, training=True)["total"]


def mfu(flops_per_image: float, images_per_s: Sequence[float], peak: float) -> list[float]:
    """The model FLOPs utilisation of each measured training rate: FLOPs per second over ``peak`` TFLOP/s."""
    return [flops_per_image * x / (peak * 1e12) for x in images_per_s]
