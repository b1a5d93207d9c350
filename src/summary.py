"""Model summary: ``python src/summary.py model=setr_mla data=ade20k [summary.flops=false]``.

Prints a table of parameter counts and GFLOPs per part of the configured SETR at the data config's crop size
(built on the meta device: nothing is allocated, loaded or downloaded). The last stdout line is one JSON object
``{"total", "encoder", "decode_head", "auxiliary_heads", "gflops"}``. Logic: :mod:`setr.tasks.summary`; config:
``conf/summary.yaml``.
"""

import os
from pathlib import Path

os.environ.setdefault("PROJECT_ROOT", str(Path(__file__).resolve().parents[1]))

import hydra

from setr.utils.launch import launch


@hydra.main(version_base="1.3", config_path="../conf", config_name="summary")
def main(cfg):
    from setr.tasks.summary import run

    run(cfg)


if __name__ == "__main__":
    launch(main)
