"""Speed benchmark: ``python src/bench.py [model=...] [data=...] [trainer.precision=bf16-mixed]``.

Measures, in one process and in interleaved rounds, the configured setting against a baseline (fp32, math
attention, no gradient checkpointing, no compile, one sliding window per forward): training steps/s, images/s and
peak memory, inference images/s (whole, slide, multi-scale + flip), the data pipeline's images/s per worker and
the workers needed, and (CUDA) the model FLOPs utilisation. Prints a table; the last stdout line is one JSON
object. Logic: :mod:`setr.tasks.bench`; config: ``conf/bench.yaml``.
"""

import os
from pathlib import Path

os.environ.setdefault("PROJECT_ROOT", str(Path(__file__).resolve().parents[1]))

import hydra

from setr.utils.launch import launch


@hydra.main(version_base="1.3", config_path="../conf", config_name="bench")
def main(cfg):
    from setr.tasks.bench import run

    run(cfg)


if __name__ == "__main__":
    launch(main)
