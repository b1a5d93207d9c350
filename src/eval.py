"""Evaluate a checkpoint: ``python src/eval.py ckpt_path=PATH data=ade20k [data.inference.mode=slide]``.

Prints the per-class table; the last stdout line is one JSON object of the metrics (also in metrics.json).
Logic: :mod:`setr.tasks.evaluate`; config: ``conf/eval.yaml``.
"""

import os
from pathlib import Path

os.environ.setdefault("PROJECT_ROOT", str(Path(__file__).resolve().parents[1]))

import hydra

from setr.utils.launch import launch


@hydra.main(version_base="1.3", config_path="../conf", config_name="eval")
def main(cfg):
    from setr.tasks.evaluate import run

    run(cfg)


if __name__ == "__main__":
    launch(main)
