"""Train SETR: ``python src/train.py [model=setr_mla] [data=pascal_context] [experiment=...] [-m sweeps]``.

The last stdout line is one JSON object with the final metrics (also written to ``<run dir>/metrics.json``).
Logic: :mod:`setr.tasks.train`; config: ``conf/train.yaml``.
"""

import os
from pathlib import Path

os.environ.setdefault("PROJECT_ROOT", str(Path(__file__).resolve().parents[1]))

import hydra

from setr.utils.launch import launch
from setr.utils.resume import apply_auto_resume


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg):
    from setr.tasks.train import run

    return run(cfg)  # the metric an Optuna sweep optimises


if __name__ == "__main__":
    launch(main, prepare=apply_auto_resume)
