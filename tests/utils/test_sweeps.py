"""Hydra sweeps of src/train.py: the basic launcher, an Optuna study, the submitit launchers (SLURM presets
composed and turned into an sbatch script; the local one really run)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import yaml

from pipeline import CONF, ROOT, run_entry, tiny_data

# a 2-step run on 8 synthetic 64x64 images, validated once at the end
SMALL = [
    "model/encoder=vit_test",
    *tiny_data(8, 4),
    "trainer.max_steps=2",
    "trainer.val_check_interval=2",
    "extras.print_config=false",
]


def sweep_dir(log_dir: Path) -> Path:
    """The one sweep folder of a -m run (and nothing else under the task's log folder)."""
    task = log_dir / "train"
    assert sorted(p.name for p in task.iterdir()) == ["multiruns"]
    (sweep,) = (task / "multiruns").iterdir()
    return sweep


def jobs(sweep: Path) -> list[Path]:
    return sorted((p for p in sweep.iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name))


def job_overrides(job: Path) -> dict[str, str]:
    return dict(o.split("=", 1) for o in yaml.safe_load((job / ".hydra" / "overrides.yaml").read_text()))


def job_metrics(job: Path) -> dict[str, float]:
    return json.loads((job / "metrics.json").read_text())


@pytest.mark.slow
def test_basic_sweep_one_folder_and_one_wandb_run_per_job(tmp_path):
    proc = run_entry("train.py", "-m", "optimizer.lr=0.01,0.001", "logger=wandb", *SMALL, log_dir=tmp_path,
                     env={"HOME": str(tmp_path / "home")})
    found = jobs(sweep_dir(tmp_path))
    assert [j.name for j in found] == ["0", "1"]
    assert [job_overrides(j)["optimizer.lr"] for j in found] == ["0.01", "0.001"]
    lines = [json.loads(ln) for ln in proc.stdout.splitlines() if ln.startswith("{")]
    assert len(lines) == 2  # each job prints its final metrics line
    run_ids = []
    for job, line in zip(found, lines):
        metrics = job_metrics(job)
        assert metrics == line and metrics["global_step"] == 2 and 0 <= metrics["val/mIoU"] <= 1
        # each job finishes its own W&B run: one offline run per job folder, named by that job's id
        run_id = (job / "wandb_run_id.txt").read_text().strip()
        (offline,) = (job / "wandb").glob("offline-run-*")
        assert offline.name.endswith(f"-{run_id}") and (offline / f"run-{run_id}.wandb").is_file()
        run_ids.append(run_id)
    assert run_ids[0] != run_ids[1]


@pytest.mark.slow
def test_optuna_study_maximises_val_miou_and_persists(tmp_path):
    db = tmp_path / "study" / "optuna.db"  # the folder does not exist yet
    proc = run_entry("train.py", "-m", "hparams_search=optuna", "hydra.sweeper.n_trials=2",
                     f"hydra.sweeper.storage.url=sqlite:///{db}", *SMALL, log_dir=tmp_path)
    assert "setup plugin" not in proc.stdout  # alembic's INFO chatter is silenced in conf/hydra/default.yaml
    sweep = sweep_dir(tmp_path)
    found = jobs(sweep)
    assert len(found) == 2
    lrs = [float(job_overrides(j)["optimizer.lr"]) for j in found]
    assert lrs[0] != lrs[1] and all(0.001 <= lr <= 0.05 for lr in lrs)
    for job in found:  # data.batch_size given on the command line is fixed, not sampled
        assert yaml.safe_load((job / ".hydra" / "config.yaml").read_text())["data"]["batch_size"] == 4
    scores = [job_metrics(j)["val/mIoU"] for j in found]

    result = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    best = max(range(2), key=lambda i: scores[i])
    assert result["best_value"] == pytest.approx(scores[best], abs=1e-6)
    assert result["best_params"]["optimizer.lr"] == pytest.approx(lrs[best], rel=1e-12)

    import optuna

    from setr.utils.optuna_storage import optuna_storage

    study = optuna.load_study(study_name="setr", storage=optuna_storage(f"sqlite:///{db}"))
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert sorted(t.value for t in done) == pytest.approx(sorted(scores), abs=1e-6)
    assert study.direction == optuna.study.StudyDirection.MAXIMIZE


def _compose(overrides: list[str]):
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=overrides, return_hydra_config=True)
        HydraConfig.instance().set_config(cfg)  # ${hydra:...} resolvers, as in a real run
    return cfg


def test_slurm_launchers_compose_and_make_the_sbatch_script(tmp_path, monkeypatch):
    from hydra.core.hydra_config import HydraConfig
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    monkeypatch.setenv("PROJECT_ROOT", str(ROOT))
    monkeypatch.setattr(HydraConfig.instance(), "cfg", None)  # _compose sets it; put back afterwards
    cfg = _compose(["hydra/launcher=submitit_slurm", f"paths.log_dir={tmp_path}"])
    plain = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    assert plain["_target_"] == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert plain["submitit_folder"].startswith(f"{tmp_path}/train/multiruns/")

    overrides = ["hydra/launcher=slurm", "hydra.launcher.partition=gpu", "trainer=slurm", "trainer.devices=4",
                 "trainer.num_nodes=2", f"paths.log_dir={tmp_path}"]
    cfg = _compose(overrides)
    plain = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    assert plain["_target_"].endswith("SlurmLauncher")
    assert (plain["nodes"], plain["tasks_per_node"], plain["gpus_per_node"]) == (2, 4, 4)
    assert plain["partition"] == "gpu" and plain["timeout_min"] == 4320 and plain["max_num_timeout"] == 3
    assert plain["submitit_folder"].startswith(f"{tmp_path}/train/multiruns/") and plain["submitit_folder"].endswith(
        "/.submitit/%j")
    assert cfg.trainer.plugins[0]["_target_"].endswith("SLURMEnvironment")
    # without a multi-node trainer the preset still resolves (one node)
    assert OmegaConf.to_container(_compose(["hydra/launcher=slurm"]).hydra.launcher, resolve=True)["nodes"] == 1

    # the plugin's own launch path up to sbatch: submitit checks for srun, so a stand-in is put on PATH
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "srun").write_text("#!/bin/sh\nexit 1\n")
    (fake_bin / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake_bin}{os.pathsep}{os.environ['PATH']}")
    cfg = _compose(overrides)
    launcher = instantiate(cfg.hydra.launcher)
    launcher.config = cfg

    import submitit

    captured = {}

    class Submitted(Exception):
        pass

    def fake_map_array(self, fn, *args):
        captured["script"] = self._executor._make_submission_file_text("python job.py", "uid")
        raise Submitted

    monkeypatch.setattr(submitit.AutoExecutor, "map_array", fake_map_array)
    with pytest.raises(Submitted):
        launcher.launch([["seed=1"]], initial_job_idx=0)
    script = captured["script"]
    for line in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=4", "#SBATCH --gpus-per-node=4",
                 "#SBATCH --cpus-per-task=8", "#SBATCH --partition=gpu", "#SBATCH --time=4320",
                 "#SBATCH --signal=USR2@120"):
        assert line in script.splitlines(), f"{line!r} not in\n{script}"


@pytest.mark.slow
def test_submitit_local_sweep_runs_both_jobs(tmp_path):
    run_entry("train.py", "-m", "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=5",
              "model/head=pup,naive", *SMALL, log_dir=tmp_path, timeout=1200)
    sweep = sweep_dir(tmp_path)
    found = jobs(sweep)
    assert [job_overrides(j)["model/head"] for j in found] == ["pup", "naive"]
    for job, head in zip(found, ("pup", "naive")):
        assert yaml.safe_load((job / ".hydra" / "config.yaml").read_text())["model"]["head"]["name"] == head
        metrics = job_metrics(job)
        assert metrics["global_step"] == 2 and math.isfinite(metrics["val/mIoU"])
    logs = sorted((sweep / ".submitit").glob("*/*_log.out"))
    assert len(logs) == 2 and all("Job completed successfully" in p.read_text() for p in logs)
