"""``python -m setr.export ckpt_path=...``: an alias of ``python src/export.py`` that older commands and scripts
use. The same config (``conf/export.yaml``), task (:mod:`setr.tasks.export`) and one-line errors."""

import os
from pathlib import Path

os.environ.setdefault("PROJECT_ROOT", str(Path(__file__).resolve().parents[2]))

import hydra

from setr.utils.launch import launch


@hydra.main(version_base="1.3", config_path="../../conf", config_name="export")
def main(cfg):
    from setr.tasks.export import run

    run(cfg)


if __name__ == "__main__":
    launch(main)
