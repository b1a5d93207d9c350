"""Nothing lost on resume: a run killed with SIGKILL twice and resumed with ``resume=auto`` logs exactly what the
straight run logs (every CSV row and TensorBoard scalar of every step, ``val/mIoU_best``, the final metrics), the
first kill right after a checkpoint taken on the last batch of an epoch, the second mid-epoch; under two-process
DDP too. And the units behind it: the metric state in the checkpoint, the CSV history continued, the loader at the
end of an epoch."""

from __future__ import annotations

import csv
import io
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch

from pipeline import ROOT, SUPPORT, TINY, last_json, run_entry

TESTS = Path(__file__).resolve().parent

# 24 samples in batches of 4: 6 steps per epoch (3 per process under two-process DDP); validation (and last.ckpt)
# every 3 steps, so the checkpoints of steps 6 and 12 (3 and 6 under DDP) are taken on the last batch of an epoch.
# Every step is logged (log_every_n_steps=1). Drop path draws from torch's RNG at every training step.
COMMON = [*TINY, "model.encoder.drop_path_rate=0.1", "trainer.val_check_interval=3", "trainer.log_every_n_steps=1",
          "logger=[csv,tensorboard]", "resume=auto"]
DDP = ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2"]


class HangAt(L.Callback):
    """Test-only: at the start of the step after global step ``step`` (the checkpoint of ``step`` is on disk), write
    ``marker`` and wait, so the test can SIGKILL the run at a known point; the kill is real."""

    def __init__(self, step: int, marker: str) -> None:
        self.step, self.marker = step, marker

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            Path(self.marker).write_text(str(self.step))
            while True:
                time.sleep(1)


def killed_at(step: int, args: list[str], log_dir: Path, tmp: Path) -> None:
    """Run ``src/train.py`` with ``args`` until it hangs after step ``step``, then SIGKILL it (every process)."""
    marker = tmp / f"hang_{step}"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "WANDB_MODE": "offline",
           "PYTHONPATH": os.pathsep.join(p for p in (str(TESTS), str(SUPPORT), os.environ.get("PYTHONPATH")) if p)}
    cmd = [sys.executable, str(ROOT / "src" / "train.py"), *args, f"paths.log_dir={log_dir}",
           f"+callbacks.hang._target_={__name__}.HangAt", f"+callbacks.hang.step={step}",
           f"+callbacks.hang.marker={marker}"]
    out = tmp / f"run_{step}.log"
    with open(out, "w") as f:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
    try:
        deadline = time.monotonic() + 600  # a hang guard only: the run takes seconds
        while not marker.exists():
            assert proc.poll() is None, f"the run ended before step {step}:\n{out.read_text()[-4000:]}"
            assert time.monotonic() < deadline, f"no step {step} after 600 s:\n{out.read_text()[-4000:]}"
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the whole job at once, as a node failure or `scancel` does
        proc.wait()


def csv_rows(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "csv" / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def same(a: str, b: str) -> bool:
    if a == b:
        return True
    try:
        return math.isclose(float(a), float(b), rel_tol=0, abs_tol=1e-6)
    except ValueError:
        return False


def tensorboard_scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def only_run(log_dir: Path) -> Path:
    (run_dir,) = (log_dir / "train" / "runs").iterdir()
    return run_dir


@pytest.mark.slow
@pytest.mark.parametrize(("extra", "steps", "kills"), [
    # (killed after step, last.ckpt's step): 2 steps after the checkpoint at the end of epoch 0, then 2 steps after
    # the one in the middle of epoch 1
    ([], 18, [(8, 6), (11, 9)]),
    # two processes (3 steps per epoch): a step after the checkpoint at the end of epoch 0
    (DDP, 9, [(4, 3)]),
], ids=["single", "ddp"])
def test_killed_run_resumes_to_the_straight_runs_every_logged_value(tmp_path, extra, steps, kills):
    args = [*COMMON, *extra, f"trainer.max_steps={steps}"]
    straight = last_json(run_entry("train.py", *args, log_dir=tmp_path / "straight"))
    straight_dir = only_run(tmp_path / "straight")

    log_dir = tmp_path / "killed"
    for kill, ckpt in kills:  # each run resumes the previous one (resume=auto) and is killed after a checkpoint
        killed_at(kill, args, log_dir, tmp_path)
        last = torch.load(only_run(log_dir) / "checkpoints" / "last.ckpt", weights_only=True, mmap=True)
        assert last["global_step"] == ckpt
    run_dir = only_run(log_dir)
    resumed = last_json(run_entry("train.py", *args, log_dir=log_dir))
    assert only_run(log_dir) == run_dir, "every resume continues the one run folder"

    # the final metrics: every value, val/mIoU_best and the epoch-dependent data order included
    assert resumed.keys() == straight.keys() and resumed["global_step"] == steps
    assert {k: v for k, v in resumed.items() if not math.isclose(v, straight[k], rel_tol=0, abs_tol=1e-6)} == {}
    assert json.loads((run_dir / "metrics.json").read_text()) == resumed

    # metrics.csv: the straight run's rows, in order, each step once, every column (epoch, lr, losses, val/*)
    want, got = csv_rows(straight_dir), csv_rows(run_dir)
    assert list(got[0]) == list(want[0]), "the same columns"
    assert [r["step"] for r in got] == [r["step"] for r in want]
    diff = [(r["step"], k, r[k], w[k]) for r, w in zip(got, want) for k in w if not same(r[k], w[k])]
    assert diff == [], diff[:10]
    best = [float(r["val/mIoU_best"]) for r in got if r["val/mIoU_best"]]
    assert len(best) == steps // 3 and best == sorted(best)
    assert len({r["epoch"] for r in got if r["epoch"]}) == 3, "3 epochs: the epoch column is compared above"

    # TensorBoard (the resumed events files purge the steps trained again): the straight run's scalars
    tb_want, tb_got = tensorboard_scalars(straight_dir), tensorboard_scalars(run_dir)
    assert tb_got.keys() == tb_want.keys() and "val/mIoU_best" in tb_got
    for tag, points in tb_want.items():
        assert [s for s, _ in tb_got[tag]] == [s for s, _ in points], tag
        assert all(math.isclose(a, b, rel_tol=0, abs_tol=1e-6) for (_, a), (_, b) in zip(tb_got[tag], points)), tag


# --------------------------------------------------------------------------------------------- units
def _tiny_module():
    from setr.checkpoint import ModelRecord
    from setr.training import SETRModule

    model = {
        "norm": "bn",
        "encoder": {"name": "vit_tiny_patch16", "img_size": 32, "arch": {"embed_dim": 32, "depth": 1, "num_heads": 2}},
        "head": {"decode": {"type": "up", "in_index": -1, "channels": 8, "kernel_size": 1, "up_scales": [1]}},
        "num_classes": 3,
    }
    return SETRModule(record=ModelRecord(model=model, class_names=["a", "b", "c"], palette=[], crop_size=32))


def test_best_miou_is_in_the_checkpoint():
    """val/mIoU_best (a MaxMetric, not a weight) survives save and load; a checkpoint before the first
    validation, or one written before the state was saved, starts it afresh."""
    module = _tiny_module()
    for v in (0.25, 0.5, 0.375):
        module.val_miou_best.update(torch.tensor(v))
    ckpt = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(ckpt)
    ckpt = torch.load(_roundtrip(ckpt), weights_only=True)  # what a resumed run reads
    resumed = _tiny_module()
    resumed.on_load_checkpoint(ckpt)
    resumed.val_miou_best.update(torch.tensor(0.4))
    assert resumed.val_miou_best.compute().item() == 0.5

    fresh = _tiny_module()
    fresh.on_save_checkpoint(ckpt := {"state_dict": fresh.state_dict()})
    for state in (ckpt, {"state_dict": fresh.state_dict()}):
        again = _tiny_module()
        again.on_load_checkpoint(state)
        again.val_miou_best.update(torch.tensor(0.125))
        assert again.val_miou_best.compute().item() == 0.125


def _roundtrip(obj) -> io.BytesIO:
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return buf


def _write_csv(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_csv_history_is_continued_from_the_checkpoint_step(tmp_path):
    """A resume at global step 6 keeps the rows of steps 0-5 as they were written, drops those of the steps the
    run trains again (and a line a kill cut short), and new rows with a new column join them under one header."""
    from setr.training.loggers import CSVLogger

    old = ("epoch,step,train/loss,val/mIoU\n"
           "0,4,0.5,\n0,5,0.25,\n0,5,,0.125\n"   # the validation after global step 6 is logged at step 5
           "1,6,0.75,\n1,7,0.875,\n1,8,0.9")      # logged after the checkpoint; the last line cut by the kill
    path = tmp_path / "csv" / "metrics.csv"
    _write_csv(path, old)
    logger = CSVLogger(tmp_path, name="csv", version="")
    logger.log_hyperparams({"seed": 1})  # train.py logs the config before fit: this must not touch the history
    assert path.read_text() == old
    logger.continue_from(6)
    logger.log_metrics({"train/loss": 0.0625, "lr-SGD": 0.01, "epoch": 1}, step=6)
    logger.save()
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["epoch", "lr-SGD", "step", "train/loss", "val/mIoU"]
    assert [(r["step"], r["train/loss"], r["val/mIoU"], r["lr-SGD"]) for r in rows] == [
        ("4", "0.5", "", ""), ("5", "0.25", "", ""), ("5", "", "0.125", ""), ("6", "0.0625", "", "0.01")]

    _write_csv(path, "")  # killed as the file was created: nothing to keep, and a well-formed file after
    logger = CSVLogger(tmp_path, name="csv", version="")
    logger.continue_from(6)
    logger.log_metrics({"train/loss": 0.5}, step=6)
    logger.save()
    assert path.read_text().splitlines() == ["step,train/loss", "6,0.5"]


def test_csv_of_a_new_run_replaces_an_old_file(tmp_path):
    """Not a resume: the file of another run in the folder is replaced at the first write (Lightning's way), never
    mixed with this run's steps."""
    from setr.training.loggers import CSVLogger

    path = tmp_path / "csv" / "metrics.csv"
    _write_csv(path, "step,train/loss\n0,9.0\n1,8.0\n")
    logger = CSVLogger(tmp_path, name="csv", version="")
    logger.log_metrics({"train/loss": 1.0}, step=0)
    logger.save()
    assert path.read_text().splitlines() == ["step,train/loss", "0,1.0"]


def test_loader_state_of_a_finished_epoch_starts_the_next_epoch_whole():
    """A checkpoint on the last batch of an epoch holds a finished epoch; Lightning moves the sampler to the next
    epoch before drawing from it, and that epoch must be the straight run's, from its first batch."""
    from setr.data.synthetic import SyntheticShapes
    from setr.training.datamodule import EpochSampler, ResumableLoader, collate

    ds = SyntheticShapes(num_samples=8, image_size=16)

    def loader() -> ResumableLoader:
        return ResumableLoader(ds, batch_size=2, sampler=EpochSampler(len(ds), shuffle=True, seed=5),
                               collate_fn=collate, drop_last=True)

    straight = loader()
    first = [b["index"].tolist() for b in straight]
    state = straight.state_dict()
    assert state == {"epoch": 0, "batches": 4, "batch_size": 2}
    straight.sampler.set_epoch(1)
    second = [b["index"].tolist() for b in straight]
    assert len(second) == 4 and second != first

    resumed = loader()
    resumed.load_state_dict(state)
    resumed.sampler.set_epoch(1)  # what Lightning's fit loop does at the epoch boundary, before iterating
    assert [b["index"].tolist() for b in resumed] == second
    assert resumed.state_dict() == {"epoch": 1, "batches": 4, "batch_size": 2}
