"""Every ``debug=`` preset the README shows, run through src/train.py with the project's default callbacks."""

from __future__ import annotations

import pytest

from pipeline import TINY, last_json, run_entry

pytestmark = pytest.mark.slow


def test_fdr_runs_one_batch_without_a_logger(tmp_path):
    proc = run_entry("train.py", *TINY, "debug=fdr", log_dir=tmp_path)
    metrics = last_json(proc)
    assert metrics["global_step"] == 1 and "val/mIoU" in metrics
    assert "LearningRateMonitor needs a logger and this run has none; left out" in proc.stdout + proc.stderr


def test_limit_runs_a_few_steps_and_validations(tmp_path):
    proc = run_entry("train.py", *TINY, "debug=limit", f"hydra.run.dir={tmp_path / 'run'}", log_dir=tmp_path)
    metrics = last_json(proc)
    assert metrics["global_step"] == 4 and 0.0 <= metrics["val/mIoU"] <= 1.0
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()


def test_profiler_prints_its_report(tmp_path):
    proc = run_entry("train.py", *TINY, "debug=profiler", "trainer.val_check_interval=10", log_dir=tmp_path)
    assert last_json(proc)["global_step"] == 20
    assert "FIT Profiler Report" in proc.stdout + proc.stderr


def test_overfit_learns_its_batch(tmp_path):
    """The preset as users run it (its 200 steps on one batch, scored on that batch), on the 4-block test encoder
    and 64x64 images so that the learning assertion is cheap (~25 s idle; the timeout is only a hang guard, far
    above what a loaded machine needs: no assertion here depends on speed)."""
    proc = run_entry("train.py", "debug=overfit", "extras.print_config=false", "model/encoder=vit_test",
                     "data.crop_size=64", "data.dataset.image_size=64", "data.batch_size=4", log_dir=tmp_path,
                     timeout=3600)
    metrics = last_json(proc)
    assert metrics["global_step"] == 200
    assert metrics["val/mIoU"] > 0.98, metrics
