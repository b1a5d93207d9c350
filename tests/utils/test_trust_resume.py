"""Nothing lost on resume: checkpoints and reports written whole or not at all (kills, a full disk, ``$TMPDIR`` on
another filesystem), ``resume=auto`` keyed on the model record, falling back past a damaged ``last.ckpt``, leaving
a finished run as it is, one best file across resumes, and one folder per run."""

from __future__ import annotations

import errno
import json
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from pipeline import CONF, ROOT, TINY, last_json, run_entry
from setr.errors import SETRConfigError

# A writer that saves a 64 MB checkpoint to argv[1] over and over through the project's CheckpointIO, printing the
# version after each save; every element of "big" holds the version, so a complete file is recognisable.
WRITER = """
import sys, torch
from setr.training.checkpoint_io import AtomicCheckpointIO
io, big, i = AtomicCheckpointIO(), torch.zeros(16 * 1024 * 1024), 0
while True:
    i += 1
    big.fill_(i)
    io.save_checkpoint({"version": i, "big": big}, sys.argv[1])
    print(i, flush=True)
"""
HANG_GUARD = 300  # seconds; each save takes well under one


def _partials(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.tmp"))


def test_sigkill_during_a_checkpoint_write_leaves_the_previous_file_whole(tmp_path):
    """$TMPDIR on another filesystem than the run folder (node-local /tmp, logs on shared storage): Lightning's
    fsspec move becomes a copy that truncates last.ckpt first, and a kill then leaves it empty. Killed in the
    middle of a write, the file must be the complete previous checkpoint, and the partial file must go at the
    next write."""
    tmpdir = Path("/dev/shm") / f"setr-test-{os.getpid()}"
    if not Path("/dev/shm").is_dir():
        pytest.skip("no /dev/shm for a $TMPDIR on another filesystem")
    tmpdir.mkdir()
    try:
        if os.stat(tmpdir).st_dev == os.stat(tmp_path).st_dev:
            pytest.skip("$TMPDIR and the run folder are on the same filesystem here")
        folder = tmp_path / "checkpoints"
        last = folder / "last.ckpt"
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(last)], stdout=subprocess.PIPE, text=True,
                                cwd=ROOT, env={**os.environ, "TMPDIR": str(tmpdir)})
        try:
            ready, _, _ = select.select([proc.stdout], [], [], HANG_GUARD)
            assert ready and proc.stdout.readline().strip() == "1", "the writer saved nothing"
            deadline = time.monotonic() + HANG_GUARD
            while not _partials(folder):  # a later version is being written now
                assert time.monotonic() < deadline and proc.poll() is None, "no write in progress was seen"
                time.sleep(0.001)
            proc.send_signal(signal.SIGKILL)
            proc.wait(HANG_GUARD)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        ckpt = torch.load(last, weights_only=True)
        assert ckpt["version"] >= 1 and ckpt["big"].numel() == 16 * 1024 * 1024
        assert bool((ckpt["big"] == ckpt["version"]).all()), "last.ckpt mixes two versions"
        left = [p for p in tmpdir.iterdir() if p.is_file()]  # (libraries may make empty folders there)
        assert not left, f"files left in $TMPDIR: {left}"

        from setr.training.checkpoint_io import AtomicCheckpointIO

        AtomicCheckpointIO().save_checkpoint({"version": 0}, folder / "step_000001.ckpt")  # the next start writes
        assert _partials(folder) == [], "the killed write's partial file was left behind"
        assert torch.load(last, weights_only=True)["version"] == ckpt["version"]
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)


def _disk_full(*_args, **_kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_disk_full_while_writing_a_checkpoint_keeps_the_previous_one(tmp_path, monkeypatch):
    from setr.training.checkpoint_io import AtomicCheckpointIO

    io = AtomicCheckpointIO()
    last = tmp_path / "last.ckpt"
    io.save_checkpoint({"version": 1, "w": torch.ones(1000)}, last)

    def full_after_some_bytes(obj, f, *args, **kwargs):
        f.write(b"x" * 4096)
        _disk_full()

    monkeypatch.setattr(torch, "save", full_after_some_bytes)
    with pytest.raises(SETRConfigError, match=r"last\.ckpt: no space left on device.*previous last\.ckpt is intact"):
        io.save_checkpoint({"version": 2, "w": torch.ones(1000)}, last)
    monkeypatch.undo()
    assert torch.load(last, weights_only=True)["version"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"], "a partial file was kept"


def test_disk_full_while_writing_a_report_or_metrics(tmp_path, monkeypatch):
    """The report files and metrics.json: one line naming the file, the previous file intact, no partial file."""
    from setr import report
    from setr.utils.output import write_metrics

    scores = {"iou": torch.tensor([0.5, 0.25]), "acc": torch.tensor([0.5, 0.5]), "aAcc": torch.tensor(0.5),
              "mIoU": torch.tensor(0.375), "mAcc": torch.tensor(0.5)}
    confmat = torch.tensor([[3, 1], [1, 3]])
    report.save_report(scores, ["a", "b"], tmp_path, confmat)
    write_metrics({"val/mIoU": 0.375}, tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert set(before) == {"val_scores.csv", "val_scores.json", "val_confusion.csv", "val_confusion.png",
                           "metrics.json"}

    monkeypatch.setattr(os, "fsync", _disk_full)  # what a full disk (or quota) reports at the latest
    with pytest.raises(SETRConfigError, match=r"val_scores\.csv: no space left on device"):
        report.save_report({**scores, "mIoU": torch.tensor(0.1)}, ["a", "b"], tmp_path, confmat)
    with pytest.raises(SETRConfigError, match=r"metrics\.json: no space left on device") as e:
        write_metrics({"val/mIoU": 0.1}, tmp_path)
    assert "\n" not in str(e.value)
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_runs_started_in_the_same_second_get_their_own_folders():
    """conf/hydra/default.yaml names run folders (and sweep folders) so that two runs composed in the same second
    differ, and the names still sort by start time."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    def folders() -> tuple[str, str]:
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            cfg = compose("train", return_hydra_config=True)
        return str(cfg.hydra.run.dir), str(cfg.hydra.sweep.dir)

    for _ in range(20):
        t0 = time.time()
        (run_a, sweep_a), (run_b, sweep_b) = folders(), folders()
        if int(t0) == int(time.time()):  # both composed within one second
            break
    else:
        pytest.fail("could not compose twice within one second")
    GlobalHydra.instance().clear()
    assert run_a != run_b and sweep_a != sweep_b
    assert Path(run_a).parent.name == "runs" and Path(sweep_a).parent.name == "multiruns"
    stamp = r"\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d-\d{6}"  # the start time to the microsecond
    assert all(re.fullmatch(stamp, Path(p).name) for p in (run_a, run_b, sweep_a, sweep_b)), (run_a, sweep_a)
    assert Path(run_a).name < Path(run_b).name, "names do not sort by start time"


def _files(run_dir: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(run_dir)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(run_dir.rglob("*")) if p.is_file()}


def _step_files(run_dir: Path) -> list[str]:
    """The best-checkpoint files; and the folder holds nothing else than them and last.ckpt (no -v1 copy)."""
    names = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    steps = [n for n in names if n.startswith("step_")]
    assert sorted([*steps, "last.ckpt"]) == names or steps == names, names
    return steps


@pytest.mark.slow
def test_resume_auto_survives_damaged_checkpoints_and_keeps_one_best_file(tmp_path):
    """Logs reached through a symlink (a cluster's usual `logs -> /scratch/...`). A kill between the best
    checkpoint and last.ckpt at the first validation, then a zero-byte last.ckpt: resume=auto continues the same
    folder from the newest readable checkpoint each time, saying so; save_top_k=1 keeps one best file; a finished
    run is left untouched; a checkpoint of another model or a damaged file in ckpt_path is one line."""
    (tmp_path / "scratch").mkdir()
    (tmp_path / "logs").symlink_to(tmp_path / "scratch")
    logs = tmp_path / "logs"
    common = [*TINY, "trainer.val_check_interval=2", "optimizer.scheduler.total_steps=6"]
    run_entry("train.py", *common, "trainer.max_steps=2", log_dir=logs)
    (run_dir,) = (logs / "train" / "runs").iterdir()
    ckpts = run_dir / "checkpoints"
    assert _step_files(run_dir) == ["step_000002.ckpt"]

    # killed after step_000002.ckpt, before last.ckpt (and SIGKILL left a partial file of the write)
    (ckpts / "last.ckpt").unlink()
    (ckpts / "last.ckpt.4242-abcdef.tmp").write_bytes(b"partial")
    proc = run_entry("train.py", *common, "resume=auto", "trainer.max_steps=4", log_dir=logs)
    assert f"resume=auto: continuing {run_dir}" in proc.stderr
    assert "has no last.ckpt" in proc.stdout + proc.stderr and "continuing from step_000002.ckpt (step 2)" in \
        proc.stdout + proc.stderr
    assert last_json(proc)["global_step"] == 4
    assert len(list((logs / "train" / "runs").iterdir())) == 1, "a new run was started"
    assert _step_files(run_dir) and len(_step_files(run_dir)) == 1, _step_files(run_dir)
    assert not list(ckpts.glob("*.tmp"))

    # last.ckpt emptied by a kill during a copy: the newest readable checkpoint, the best step file, takes over
    (ckpts / "last.ckpt").write_bytes(b"")
    (best,) = _step_files(run_dir)
    proc = run_entry("train.py", *common, "resume=auto", "trainer.max_steps=6", log_dir=logs)
    out = proc.stdout + proc.stderr
    assert "its last.ckpt is not a readable checkpoint" in out and "empty" in out
    assert f"continuing from {best}" in out
    assert last_json(proc)["global_step"] == 6
    assert len(_step_files(run_dir)) == 1, _step_files(run_dir)
    assert torch.load(ckpts / "last.ckpt", weights_only=True)["global_step"] == 6

    # finished: nothing rewritten, its stored metrics are the final line
    before = _files(run_dir)
    proc = run_entry("train.py", *common, "resume=auto", "trainer.max_steps=6", log_dir=logs)
    assert f"resume=auto: {run_dir} is finished (step 6 of trainer.max_steps=6)" in proc.stderr
    assert last_json(proc) == json.loads((run_dir / "metrics.json").read_text())
    assert last_json(proc)["global_step"] == 6 and "val/mIoU" in last_json(proc)
    assert _files(run_dir) == before, "a finished run was rewritten"
    assert len(list((logs / "train" / "runs").iterdir())) == 1

    # another head (same experiment / model / data choices): resume=auto does not pick the run (it crashed on the
    # weights' sizes before); ckpt_path= refuses it naming the keys
    fresh = run_entry("train.py", "model/head=naive", *TINY, "resume=auto", "train=false", log_dir=logs)
    assert "starting a new run" in fresh.stderr and f"{run_dir}: another model at model.head.name" in fresh.stderr
    other = run_entry("train.py", "model/head=naive", *TINY, f"ckpt_path={ckpts / 'last.ckpt'}",
                      "trainer.max_steps=8", log_dir=logs, check=False)
    assert other.returncode == 2
    lines = other.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ckpt_path: the checkpoint's model differs from the config at "
                                "model.head.name (pup_small vs naive)"), other.stderr[-2000:]
    assert "Traceback" not in other.stderr

    # a truncated file in ckpt_path: one line naming it and why
    cut = tmp_path / "cut.ckpt"
    cut.write_bytes((ckpts / "last.ckpt").read_bytes()[:50_000])
    bad = run_entry("train.py", *TINY, f"ckpt_path={cut}", "trainer.max_steps=8", log_dir=logs, check=False)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert bad.stderr.strip().splitlines()[-1].startswith(f"error: ckpt_path: {cut} is not a readable checkpoint")


def _fit(dirpath: Path, max_steps: int, ckpt_path: Path | None = None) -> None:
    """A 1-weight Lightning model whose monitored score improves at every validation (every 2 steps), through the
    project's Checkpoint callback as conf/callbacks/model_checkpoint.yaml configures it."""
    import lightning as L
    from torch.utils.data import DataLoader, TensorDataset

    from setr.training.callbacks import Checkpoint
    from setr.training.checkpoint_io import use_atomic_checkpoints

    class Tiny(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Linear(1, 1)

        def training_step(self, batch, _):
            return self.w(batch[0]).pow(2).mean()

        def validation_step(self, batch, _):
            self.log("val/mIoU", float(self.global_step))

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    data = DataLoader(TensorDataset(torch.ones(64, 1)), batch_size=1)
    cb = Checkpoint(dirpath=str(dirpath), filename="step_{step:06d}", monitor="val/mIoU", mode="max", save_last=True,
                    save_top_k=1, auto_insert_metric_name=False, save_on_train_epoch_end=False)
    trainer = L.Trainer(max_steps=max_steps, val_check_interval=2, limit_val_batches=1, callbacks=[cb], logger=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        accelerator="cpu", devices=1)
    use_atomic_checkpoints(trainer)
    trainer.fit(Tiny(), train_dataloaders=data, val_dataloaders=data, ckpt_path=ckpt_path)


def test_save_top_k_keeps_one_best_file_after_a_kill_between_two_checkpoint_writes(tmp_path):
    """Killed at step 6 after the new best step_000006.ckpt was written, before last.ckpt and before the old best
    was deleted: the resumed run (from last.ckpt, step 4) wrote step_000006-v1.ckpt beside the orphan and kept
    both. After the resume the folder holds one best file and last.ckpt."""
    ckpts = tmp_path / "checkpoints"
    _fit(ckpts, 4)
    assert sorted(p.name for p in ckpts.iterdir()) == ["last.ckpt", "step_000004.ckpt"]
    saved = {p.name: p.read_bytes() for p in ckpts.iterdir()}
    _fit(ckpts, 6, ckpts / "last.ckpt")
    assert sorted(p.name for p in ckpts.iterdir()) == ["last.ckpt", "step_000006.ckpt"]
    for name, data in saved.items():  # the state the kill left: last.ckpt of step 4, both best files
        (ckpts / name).write_bytes(data)
    _fit(ckpts, 8, ckpts / "last.ckpt")
    assert sorted(p.name for p in ckpts.iterdir()) == ["last.ckpt", "step_000008.ckpt"]
    assert torch.load(ckpts / "last.ckpt", weights_only=True)["global_step"] == 8


def test_every_trainer_writes_checkpoints_atomically_with_or_without_plugins(monkeypatch):
    """trainer=slurm's `plugins` list (SLURM's environment) and a DDP strategy keep the atomic writer; a CheckpointIO
    the user names in trainer.plugins is kept."""
    import lightning as L
    from lightning.pytorch.plugins.environments import SLURMEnvironment
    from lightning.pytorch.plugins.io import TorchCheckpointIO
    from lightning.pytorch.strategies import DDPStrategy

    from setr.training.checkpoint_io import AtomicCheckpointIO, use_atomic_checkpoints

    class Mine(TorchCheckpointIO):
        pass

    for k, v in {"SLURM_NTASKS": "1", "SLURM_NTASKS_PER_NODE": "1", "SLURM_JOB_ID": "7", "SLURM_NODEID": "0",
                 "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODELIST": "localhost",
                 "SLURM_JOB_NAME": "setr"}.items():
        monkeypatch.setenv(k, v)  # the job trainer=slurm runs in
    quiet = {"logger": False, "enable_progress_bar": False, "enable_model_summary": False, "accelerator": "cpu"}
    plain = L.Trainer(devices=1, **quiet)
    slurm = L.Trainer(devices=1, strategy=DDPStrategy(), plugins=[SLURMEnvironment(auto_requeue=False)], **quiet)
    own = L.Trainer(devices=1, plugins=[Mine()], **quiet)
    for trainer in (plain, slurm, own):
        use_atomic_checkpoints(trainer)
    assert type(plain.strategy.checkpoint_io) is AtomicCheckpointIO
    assert type(slurm.strategy.checkpoint_io) is AtomicCheckpointIO
    assert isinstance(slurm.strategy.cluster_environment, SLURMEnvironment)
    assert type(own.strategy.checkpoint_io) is Mine
