"""Speed benchmark: ``python src/bench.py [model=...] [data=...] [trainer.precision=bf16-mixed]``.

Measures, in one process and in interleaved rounds, the configured setting against a baseline (fp32, math
attention, no gradient checkpointing, no compile, one sliding window per forward): training steps/s, images/s and
peak memory, inference images/s (whole, slide, multi-scale + flip), the data pipeline's images/s per worker and
the workers needed, and (CUDA) the model FLOPs utilisation. Prints a table; the last stdout line is one JSON
object. Logic: :mod:`setr.tasks.bench`; config: ``conf/bench.yaml``.
The installed command ``setr-bench`` is the same, from any working folder (:mod:`setr.cli`).
"""

from setr.cli import bench

if __name__ == "__main__":
    bench()
