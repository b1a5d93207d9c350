"""trainer=ddp on CPU (2 gloo processes) under Hydra: metrics reduced across ranks equal a single-process
evaluation, rank 1 joins rank 0's run folder, and a -m sweep (an Optuna one) with DDP neither hangs nor forks."""

from __future__ import annotations

import json
import subprocess

import pytest
import torch
import yaml

from pipeline import CONF, last_json, run_entry
from setr.utils.distributed import is_rank_zero

# 7 validation images in batches of 2: rank 0 scores 4 of them, rank 1 the other 3 (uneven, nothing padded).
# The naive head predicts several classes after 2 small steps, so the confusion matrix is not one column.
DATA = [
    "data.crop_size=64",
    "data.dataset.image_size=64",
    "data.dataset.num_samples=16",
    "data.val_dataset.num_samples=7",
    "data.val_batch_size=2",
    "data.num_workers=0",
]
TRAIN = [
    "model/encoder=vit_test",
    "model/head=naive",
    *DATA,
    "data.train_pipeline.0.img_scale=[64,64]",
    "data.batch_size=2",
    "optimizer.lr=0.001",
    "trainer.max_steps=2",
    "trainer.val_check_interval=2",
    "extras.print_config=false",
]
DDP = ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2"]
SCORES = ("val/mIoU", "val/mAcc", "val/aAcc", "val/IoU/background", "val/IoU/disc", "val/IoU/rectangle",
          "val/IoU/triangle")


def json_lines(proc: subprocess.CompletedProcess) -> list[dict]:
    return [json.loads(ln) for ln in proc.stdout.splitlines() if ln.startswith("{")]


@pytest.mark.parametrize(("env", "zero"), [
    ({}, True),
    ({"LOCAL_RANK": "1"}, False),
    ({"RANK": "1"}, False),
    ({"LOCAL_RANK": "0", "NODE_RANK": "1"}, False),
    ({"SLURM_PROCID": "3"}, False),  # SLURM starts the ranks; Lightning exports no RANK there
    ({"SLURM_PROCID": "0"}, True),
])
def test_is_rank_zero(monkeypatch, env, zero):
    for var in ("LOCAL_RANK", "RANK", "NODE_RANK", "SLURM_PROCID"):
        monkeypatch.delenv(var, raising=False)
    for var, value in env.items():
        monkeypatch.setenv(var, value)
    assert is_rank_zero() is zero


@pytest.mark.slow
def test_ddp_metrics_equal_single_process_evaluation(tmp_path):
    proc = run_entry("train.py", *DDP, *TRAIN, log_dir=tmp_path / "train_logs", timeout=1200)  # default callbacks
    # rank 1 joined rank 0's run: one run folder, no sweep folder, one final metrics line
    task = tmp_path / "train_logs" / "train"
    assert sorted(p.name for p in task.iterdir()) == ["runs"]
    (run_dir,) = (task / "runs").iterdir()
    assert len(json_lines(proc)) == 1
    assert sorted(p.name for p in run_dir.glob("*.log")) == ["train.log"]

    # trainer=ddp asks for SyncBatchNorm, which PyTorch runs on GPUs only: tasks.py turns it off on CPU
    config = yaml.safe_load((run_dir / ".hydra" / "config.yaml").read_text())
    assert config["trainer"]["sync_batchnorm"] is True and config["model"]["norm"] == "bn"
    assert "keeping BatchNorm on CPU" in (run_dir / "train.log").read_text()

    ddp = last_json(proc)
    assert ddp == json.loads((run_dir / "metrics.json").read_text()) and ddp["global_step"] == 2
    assert sum(ddp[f"val/IoU/{c}"] > 0 for c in ("background", "disc", "rectangle", "triangle")) >= 2

    # the same weights scored by one process on the whole validation set (the checkpoint of that validation)
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    assert torch.load(ckpt, map_location="cpu", weights_only=False)["global_step"] == 2
    eval_dir = tmp_path / "eval"
    single = last_json(run_entry("eval.py", f"ckpt_path={ckpt}", *DATA, "trainer.accelerator=cpu",
                                 "extras.print_config=false", f"hydra.run.dir={eval_dir}",
                                 log_dir=tmp_path / "eval_logs"))
    for key in SCORES:
        assert ddp[key] == pytest.approx(single[key], abs=1e-6), key

    # the saved confusion matrix is the all-reduced one (both ranks' pixels), not rank 0's shard
    ddp_cm, single_cm = read_confusion(run_dir / "val_confusion.csv"), read_confusion(eval_dir / "val_confusion.csv")
    assert ddp_cm == single_cm
    assert sum(map(sum, ddp_cm)) == 7 * 64 * 64 - ignored_pixels(7), "every labelled validation pixel, once"
    report = json.loads((run_dir / "val_scores.json").read_text())
    assert report["mIoU"] == pytest.approx(ddp["val/mIoU"], abs=1e-6)
    assert [r["IoU"] for r in report["per_class"]] == pytest.approx(iou_of(ddp_cm), abs=1e-6)


def read_confusion(path) -> list[list[int]]:
    import csv
    from pathlib import Path

    rows = list(csv.reader(Path(path).read_text().splitlines()))
    return [[int(v) for v in row[1:]] for row in rows[1:]]


def iou_of(cm: list[list[int]]) -> list[float]:
    n = len(cm)
    out = []
    for i in range(n):
        tp, gt, pred = cm[i][i], sum(cm[i]), sum(cm[r][i] for r in range(n))
        out.append(tp / (gt + pred - tp))
    return out


def ignored_pixels(n: int) -> int:
    """Pixels labelled 255 in the first ``n`` synthetic 64x64 validation images (as the data module reads them)."""
    from setr.data import build_dataset

    ds = build_dataset("synthetic", "val", num_samples=n, image_size=64)
    return sum(int((ds[i]["mask"] == 255).sum()) for i in range(n))


@pytest.mark.slow
def test_ddp_in_an_optuna_sweep_does_not_hang_or_fork(tmp_path):
    # hparams_search=optuna sets hydra.mode=MULTIRUN in the config itself: rank 1 must still run one job only
    try:
        proc = run_entry("train.py", "-m", "hparams_search=optuna", "hydra.sweeper.n_trials=1", *DDP, *TRAIN,
                         "logger=wandb", log_dir=tmp_path, timeout=1200,
                         env={"HOME": str(tmp_path / "home")})
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"a DDP job inside a -m sweep hung: {e}")
    task = tmp_path / "train"
    assert sorted(p.name for p in task.iterdir()) == ["multiruns"]
    sweeps = sorted((task / "multiruns").iterdir())
    assert len(sweeps) == 1, f"rank 1 started a sweep of its own: {[p.name for p in sweeps]}"
    sweep = sweeps[0]
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir()) == ["0"]
    job = sweep / "0"
    metrics = json.loads((job / "metrics.json").read_text())
    assert json_lines(proc) == [metrics] and metrics["global_step"] == 2
    result = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert result["best_value"] == pytest.approx(metrics["val/mIoU"], abs=1e-6)
    assert len(list((job / "wandb").glob("offline-run-*"))) == 1  # rank 0 alone logs to W&B


def test_child_command_joins_the_current_job(tmp_path, monkeypatch):
    """What Lightning runs for rank 1 inside an Optuna sweep job: that job's overrides (not the sweep's command
    line), its output folder, run mode, no .hydra folder and no log handlers of its own."""
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig
    from lightning.pytorch.strategies.launchers import subprocess_script as pl_launcher
    from omegaconf import open_dict

    from pipeline import ROOT
    from setr.utils.distributed import patch_lightning_hydra_ddp

    task_overrides = ["hparams_search=optuna", "optimizer.lr=0.02", *DDP]
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=task_overrides, return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(tmp_path / "multiruns" / "t" / "0")
        cfg.hydra.runtime.cwd = str(ROOT)
        cfg.hydra.job.name = "train"
        cfg.hydra.overrides.task = task_overrides
    monkeypatch.setattr(HydraConfig.instance(), "cfg", None)
    HydraConfig.instance().set_config(cfg)
    monkeypatch.setattr("sys.argv", ["src/train.py", "-m", "hparams_search=optuna", "optimizer.lr=0.02", *DDP])
    monkeypatch.setattr(pl_launcher, "_hydra_subprocess_cmd", pl_launcher._hydra_subprocess_cmd)
    patch_lightning_hydra_ddp()
    command, cwd = pl_launcher._hydra_subprocess_cmd(1)

    assert cwd == str(ROOT) and command[1] == str(ROOT / "src" / "train.py")
    assert "-m" not in command and "--multirun" not in command
    assert command[2:2 + len(task_overrides)] == task_overrides
    extra = command[2 + len(task_overrides):]
    assert f'hydra.run.dir="{tmp_path}/multiruns/t/0"' in extra and "hydra.mode=RUN" in extra
    assert {"hydra.output_subdir=null", "hydra/job_logging=disabled", "~hydra.job_logging.handlers"} <= set(extra)

    # Hydra accepts exactly these overrides: run mode despite hparams_search=optuna, no file handler left over
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        child = compose("train", overrides=command[2:], return_hydra_config=True)
    assert str(child.hydra.mode) == "RunMode.RUN" and child.hydra.run.dir == f"{tmp_path}/multiruns/t/0"
    assert "handlers" not in child.hydra.job_logging and child.optimizer.lr == 0.02
