"""Shared bits of the end-to-end tests: tiny overrides and a runner for the real entry points."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from setr.paths import CONF_DIR, PROJECT_ROOT

ROOT = PROJECT_ROOT  # the project (setr.paths: the one place that computes it)
SUPPORT = Path(__file__).resolve().parent  # tests/: conftest, pipeline, fake_datasets (importable helpers)
CONF = CONF_DIR


def tiny_data(train: int = 24, val: int = 8) -> list[str]:
    """Overrides for ``train`` / ``val`` synthetic 64x64 images in batches of 4, read in the main process."""
    return [
        "data.crop_size=64",
        "data.dataset.image_size=64",
        "data.train_pipeline.0.img_scale=[64,64]",
        f"data.dataset.num_samples={train}",
        f"data.val_dataset.num_samples={val}",
        "data.batch_size=4",
        "data.val_batch_size=4",
        "data.num_workers=0",
    ]


# a tiny SETR (dim 64, 4 blocks) on 64x64 synthetic images: a training step takes a few ms. The project's
# default callbacks stay on (checkpoints, early stopping, LR monitor, progress bar, summary, W&B samples, the
# metric report): end-to-end tests run what users run.
TINY = [
    "model/encoder=vit_test",
    *tiny_data(),
    "extras.print_config=false",
]


def run_entry(script: str, *args: str, log_dir: Path, timeout: int = 1200, env: dict | None = None,
              check: bool = True) -> subprocess.CompletedProcess:
    """Run ``src/<script>`` with ``args`` (logs under ``log_dir``); returns the completed process."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "WANDB_MODE": "offline", **(env or {})}
    cmd = [sys.executable, str(ROOT / "src" / script), *args, f"paths.log_dir={log_dir}"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=full_env,
                          stdin=subprocess.DEVNULL)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def last_json(proc: subprocess.CompletedProcess) -> dict:
    lines = [ln for ln in proc.stdout.strip().splitlines() if ln.strip()]
    return json.loads(lines[-1])
