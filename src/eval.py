"""Evaluate a checkpoint: ``python src/eval.py ckpt_path=PATH data=ade20k [data.inference.mode=slide]``.

Prints the per-class table; the last stdout line is one JSON object of the metrics (also in metrics.json).
Logic: :mod:`setr.tasks.evaluate`; config: ``conf/eval.yaml``.
The installed command ``setr-eval`` is the same, from any working folder (:mod:`setr.cli`).
"""

from setr.cli import evaluate

if __name__ == "__main__":
    evaluate()
