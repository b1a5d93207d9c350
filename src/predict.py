"""Predict with a checkpoint: ``python src/predict.py ckpt_path=PATH input=IMAGE|FOLDER|'GLOB' [side_by_side=true]``.

Writes ``<stem>_label.png`` (mode "P", class ids, the checkpoint's palette) and ``<stem>_overlay.png`` per image
into ``output_dir`` (default ``<run dir>/predictions``). Unreadable images are reported and skipped; the last
stdout line is one JSON object ``{"processed", "failed", "failures", "output_dir", "device"}``. Exit code 1 when
some images failed, 2 (one ``error: ...`` line on stderr) for a bad config, no matching input or a bad checkpoint.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("PROJECT_ROOT", str(Path(__file__).resolve().parents[1]))

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from setr.utils.run import main_guard, print_last_line, run_hydra_main  # noqa: E402


@hydra.main(version_base="1.3", config_path="../conf", config_name="predict")
@main_guard
def main(cfg: DictConfig) -> None:
    from setr.predict import run

    result = run(cfg)
    print_last_line(result)
    if result["failed"]:
        raise SystemExit(1)


if __name__ == "__main__":
    sys.exit(run_hydra_main(main))
