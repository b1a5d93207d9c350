"""Evaluate a checkpoint: ``python src/eval.py ckpt_path=PATH data=ade20k [data.inference.mode=slide]``.

Prints the per-class table; the last stdout line is one JSON object of the metrics (also in metrics.json).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("PROJECT_ROOT", str(Path(__file__).resolve().parents[1]))

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from setr.utils.run import main_guard, print_last_line, run_hydra_main  # noqa: E402


@hydra.main(version_base="1.3", config_path="../conf", config_name="eval")
@main_guard
def main(cfg: DictConfig) -> None:
    from setr.tasks import evaluate

    print_last_line(evaluate(cfg))


if __name__ == "__main__":
    sys.exit(run_hydra_main(main))
