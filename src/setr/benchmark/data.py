"""The data pipeline's side of the benchmark: images/s of one worker (:func:`setr.data.speed.pipeline_throughput`,
the train pipeline in this process) and the workers per GPU that feed a measured training rate."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any


def data_throughput(data: Mapping[str, Any], num_images: int, seed: int) -> dict[str, Any]:
    """:func:`setr.data.speed.pipeline_throughput` of the data config ``data`` on ``num_images`` source images of
    the dataset's typical size (the function's default, not the inference image)."""
    from setr.data.speed import pipeline_throughput

    return dict(pipeline_throughput(data, num_images=num_images, image_size=None, seed=seed))


def workers_per_gpu(train_images_per_s: Sequence[float], per_worker: float) -> list[float]:
    """Workers needed to feed each measured training rate (rounded up), one worker giving ``per_worker``
    images/s; none when a worker gives nothing (the figure would be infinite)."""
    if per_worker <= 0:
        return []
    return [float(math.ceil(x / per_worker)) for x in train_images_per_s]
