"""Predict with a checkpoint: ``python src/predict.py ckpt_path=PATH input=IMAGE|FOLDER|'GLOB' [side_by_side=true]``.

Writes ``<stem>_label.png`` (class ids with the checkpoint's palette) and ``<stem>_overlay.png`` per image. The
last stdout line is one JSON object ``{"processed", "failed", "failures", "output_dir", "device"}``; exit code 1
when some images failed, 2 (one ``error: ...`` line) for a bad config or checkpoint. Logic:
:mod:`setr.tasks.predict`; config: ``conf/predict.yaml``.
"""

import os
from pathlib import Path

os.environ.setdefault("PROJECT_ROOT", str(Path(__file__).resolve().parents[1]))

import hydra

from setr.utils.launch import launch


@hydra.main(version_base="1.3", config_path="../conf", config_name="predict")
def main(cfg):
    from setr.tasks.predict import run

    run(cfg)


if __name__ == "__main__":
    launch(main)
