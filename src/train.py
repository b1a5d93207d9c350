"""Train SETR: ``python src/train.py [model=setr_mla] [data=pascal_context] [experiment=...] [-m sweeps]``.

The last stdout line is one JSON object with the final metrics (also written to ``<run dir>/metrics.json``).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("PROJECT_ROOT", str(Path(__file__).resolve().parents[1]))

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from setr.utils.run import apply_auto_resume, is_rank_zero, main_guard, print_last_line  # noqa: E402


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
@main_guard
def main(cfg: DictConfig) -> float | None:
    from setr.tasks import train

    metrics = train(cfg)
    if is_rank_zero():
        print_last_line(metrics)
    value = metrics.get(cfg.get("metric", "val/mIoU"))
    return float(value) if value is not None else None  # what an Optuna sweep optimises


if __name__ == "__main__":
    sys.argv = apply_auto_resume(sys.argv)
    main()
