"""A cluster's faults: SIGTERM / SIGINT / SIGUSR1 save the current step and exit non-zero with the resume command
(a re-queue under SLURM), the resumed run equals the straight one, DDP neither hangs nor leaves a process behind,
and a diverging loss ends with one line naming the step and the remedy.

Signals are sent from this process to the training subprocess. To hit a known step without depending on speed,
the run gets a test callback (:class:`PauseAt`, added with ``+callbacks.pause``) that waits after that step until
the test has sent its signal; the signal then arrives while the process sleeps in that callback, as it would
during any step.
"""

from __future__ import annotations

import csv
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch

from pipeline import ROOT, SUPPORT, TINY, last_json

TESTS = Path(__file__).resolve().parent
HANG_GUARD_S = 600  # a run of these sizes takes seconds; waiting this long means it hangs

# 24 training images in batches of 4: 6 steps an epoch; validation every 4 steps and at the end (step 12)
RUN = [*TINY, "trainer.max_steps=12", "trainer.val_check_interval=4", "trainer.log_every_n_steps=1"]


class PauseAt(L.Callback):
    """Test harness: on rank 0, after training step ``step``, write ``<folder>/ready`` and wait for
    ``<folder>/go`` (written by the test once it has sent its signal)."""

    def __init__(self, step: int, folder: str) -> None:
        self.step = step
        self.folder = Path(folder)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step != self.step or not trainer.is_global_zero or (self.folder / "ready").exists():
            return
        (self.folder / "ready").write_text(str(os.getpid()))
        deadline = time.monotonic() + HANG_GUARD_S
        while not (self.folder / "go").exists() and time.monotonic() < deadline:
            time.sleep(0.05)


def _env(extra: dict | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SETR_DDP"))}
    env.update({"PYTHONUNBUFFERED": "1", "WANDB_MODE": "offline",
                "PYTHONPATH": os.pathsep.join([str(TESTS), str(SUPPORT), env.get("PYTHONPATH", "")]).rstrip(
                    os.pathsep)})
    env.update(extra or {})
    return env


def _cmd(*args: str) -> list[str]:
    return [sys.executable, str(ROOT / "src" / "train.py"), *args]


def _run(cmd: list[str], env: dict, tmp: Path, name: str) -> subprocess.CompletedProcess:
    out, err = tmp / f"{name}.out", tmp / f"{name}.err"
    with open(out, "w") as fo, open(err, "w") as fe:
        proc = subprocess.run(cmd, cwd=ROOT, stdout=fo, stderr=fe, env=env, stdin=subprocess.DEVNULL,
                              timeout=HANG_GUARD_S)
    return subprocess.CompletedProcess(cmd, proc.returncode, out.read_text(), err.read_text())


def signal_at_step(cmd: list[str], step: int, signum: int, env: dict, tmp: Path,
                   name: str) -> subprocess.CompletedProcess:
    """Run ``cmd``, send ``signum`` while it waits after training step ``step``, let it go on; the finished run."""
    pause = tmp / f"pause_{name}"
    pause.mkdir()
    cmd = [*cmd, "+callbacks.pause._target_=test_trust_signals.PauseAt", f"+callbacks.pause.step={step}",
           f"+callbacks.pause.folder={pause}"]
    out, err = tmp / f"{name}.out", tmp / f"{name}.err"
    with open(out, "w") as fo, open(err, "w") as fe:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=fo, stderr=fe, env=env, stdin=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + HANG_GUARD_S
            while not (pause / "ready").exists():
                assert proc.poll() is None, f"ended before step {step}:\n{err.read_text()[-3000:]}"
                assert time.monotonic() < deadline, "never reached the step"
                time.sleep(0.05)
            proc.send_signal(signum)
            (pause / "go").write_text("")
            proc.wait(timeout=HANG_GUARD_S)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return subprocess.CompletedProcess(cmd, proc.returncode, out.read_text(), err.read_text())


def stop_line(proc: subprocess.CompletedProcess) -> str:
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("stopped: ")]
    assert len(lines) == 1, proc.stderr[-3000:]
    return lines[0]


def csv_rows(run_dir: Path) -> list[dict]:
    """Every row the CSV logger wrote (every step: ``trainer.log_every_n_steps=1``)."""
    with open(run_dir / "csv" / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def ckpt_step(path: Path) -> int:
    return torch.load(path, map_location="cpu", weights_only=False)["global_step"]


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> dict:
    """The final metrics of the uninterrupted run."""
    tmp = tmp_path_factory.mktemp("straight")
    proc = _run(_cmd(*RUN, f"paths.log_dir={tmp / 'logs'}", f"hydra.run.dir={tmp / 'run'}"), _env(), tmp, "straight")
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = last_json(proc)
    assert metrics["global_step"] == 12
    return {**metrics, "csv": csv_rows(tmp / "run")}


@pytest.mark.slow
@pytest.mark.parametrize(("signum", "step"), [
    (signal.SIGTERM, 4),   # a validation step: it validates first, then stops
    (signal.SIGUSR1, 5),   # outside SLURM: handled as SIGTERM, not a silent kill
    (signal.SIGINT, 9),    # second epoch, mid-epoch
])
def test_signal_saves_the_step_and_the_printed_command_resumes_exactly(tmp_path, straight, signum, step):
    run_dir = tmp_path / "run"
    proc = signal_at_step(_cmd(*RUN, f"paths.log_dir={tmp_path / 'logs'}", f"hydra.run.dir={run_dir}"), step,
                          signum, _env(), tmp_path, "preempted")
    assert proc.returncode == 128 + signum, proc.stderr[-3000:]
    line = stop_line(proc)
    name = signal.Signals(signum).name
    last = run_dir / "checkpoints" / "last.ckpt"
    assert line.startswith(f"stopped: {name} at step {step}: checkpoint {last}; resume with: python "), line
    assert ckpt_step(last) == step
    assert not (run_dir / "metrics.json").exists()  # no final metrics for an unfinished run

    # the printed command, as a user would paste it
    command = shlex.split(line.split("resume with: ", 1)[1])
    assert command[-1] == f"resume={run_dir}"
    resumed = _run([sys.executable, *command[1:]], _env(), tmp_path, "resumed")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    expected = {k: v for k, v in straight.items() if k != "csv"}
    assert last_json(resumed) == expected
    # every logged value, the row of the step the signal stopped at included
    assert csv_rows(run_dir) == straight["csv"]


@pytest.mark.slow
def test_slurm_requeue_signal_saves_requeues_and_the_requeued_job_resumes_exactly(tmp_path, straight):
    """SIGUSR1 in a SLURM batch job (Lightning detects SLURM and re-queues on it): checkpoint of the current
    step, ``scontrol requeue <job id>`` (a stand-in on PATH records its call), and the re-queued job (the same
    command, with resume=auto) continues the run to the straight run's numbers."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "scontrol_calls.txt"
    (bin_dir / "scontrol").write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')
    (bin_dir / "scontrol").chmod(0o755)
    slurm = {"SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "setr", "SLURM_NTASKS": "1", "SLURM_PROCID": "0",
             "SLURM_LOCALID": "0", "SLURM_NODEID": "0", "SLURM_NODELIST": "localhost",
             "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    cmd = _cmd(*RUN, "resume=auto", f"paths.log_dir={tmp_path / 'logs'}")
    proc = signal_at_step(cmd, 7, signal.SIGUSR1, _env(slurm), tmp_path, "preempted")
    assert proc.returncode == 128 + signal.SIGUSR1, proc.stderr[-3000:]
    line = stop_line(proc)
    assert "SIGUSR1 at step 7" in line and "re-queued SLURM job 4242" in line, line
    assert calls.read_text().split() == ["requeue", "4242"]
    (run_dir,) = (tmp_path / "logs" / "train" / "runs").iterdir()
    assert ckpt_step(run_dir / "checkpoints" / "last.ckpt") == 7

    # the re-queued job: SLURM runs the same command again (SLURM_RESTART_COUNT set)
    requeued = _run(cmd, _env({**slurm, "SLURM_RESTART_COUNT": "1"}), tmp_path, "requeued")
    assert requeued.returncode == 0, requeued.stderr[-3000:]
    assert f"continuing {run_dir}" in requeued.stderr
    assert last_json(requeued) == {k: v for k, v in straight.items() if k != "csv"}
    assert csv_rows(run_dir) == straight["csv"]
    assert calls.read_text().split() == ["requeue", "4242"]  # not re-queued again


# two gloo processes (trainer=ddp on CPU), as tests/test_ddp.py
DDP = ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "model/encoder=vit_test", "model/head=naive",
       "data.crop_size=64", "data.dataset.image_size=64", "data.train_pipeline.0.img_scale=[64,64]",
       "data.dataset.num_samples=16", "data.val_dataset.num_samples=7", "data.batch_size=2",
       "data.val_batch_size=2", "data.num_workers=0", "extras.print_config=false", "trainer.val_check_interval=2"]


def _children(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _wait_gone(pids: list[int]) -> list[int]:
    deadline = time.monotonic() + HANG_GUARD_S
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    return [p for p in pids if _alive(p)]


@pytest.mark.slow
def test_ddp_sigterm_at_any_moment_saves_agreed_step_and_leaves_no_process(tmp_path):
    """SIGTERM to rank 0 wherever it is (in the forward pass, an all-reduce, a validation...): both ranks stop
    after the same step, rank 0 writes last.ckpt of that step, exit 143, nothing left running."""
    run_dir = tmp_path / "run"
    cmd = _cmd(*DDP, "trainer.max_steps=100000", f"paths.log_dir={tmp_path / 'logs'}", f"hydra.run.dir={run_dir}")
    err = tmp_path / "ddp.err"
    with open(err, "w") as fe:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=fe, env=_env(),
                                stdin=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + HANG_GUARD_S
            while not (run_dir / "checkpoints" / "last.ckpt").exists():  # the first validation (step 2) is done
                assert proc.poll() is None and time.monotonic() < deadline, err.read_text()[-3000:]
                time.sleep(0.05)
            children = _children(proc.pid)
            assert children, "rank 1 is a child of rank 0"
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=HANG_GUARD_S)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    stderr = err.read_text()
    assert proc.returncode == 143, stderr[-3000:]
    assert _wait_gone(children) == []
    line = stop_line(subprocess.CompletedProcess(cmd, 143, "", stderr))
    step = int(line.split(" at step ")[1].split(":")[0])
    assert step >= 2 and ckpt_step(run_dir / "checkpoints" / "last.ckpt") == step
    assert "Traceback" not in stderr


@pytest.mark.slow
def test_ddp_sigterm_during_start_up_leaves_no_orphan(tmp_path):
    """Rank 0 stopped while rank 1 starts (it waits in the rendezvous for rank 0): rank 1 exits too."""
    cmd = _cmd(*DDP, "trainer.max_steps=100000", f"paths.log_dir={tmp_path / 'logs'}",
               f"hydra.run.dir={tmp_path / 'run'}")
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=_env(),
                            stdin=subprocess.DEVNULL, text=True)
    try:
        deadline = time.monotonic() + HANG_GUARD_S
        while not (children := _children(proc.pid)):
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.01)
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=HANG_GUARD_S)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode != 0
    assert _wait_gone(children) == [], "rank 1 outlived rank 0"


@pytest.mark.slow
def test_diverging_loss_is_one_line_naming_the_step_and_the_remedy(tmp_path):
    proc = _run(_cmd(*TINY, "optimizer.lr=1e6", "trainer.max_steps=20", "trainer.val_check_interval=10",
                     f"paths.log_dir={tmp_path / 'logs'}"), _env(), tmp_path, "diverged")
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert " at step " in errors[0] and "diverged" in errors[0]
    for remedy in ("optimizer.lr", "trainer.gradient_clip_val"):
        assert remedy in errors[0], errors[0]



@pytest.mark.parametrize(("env", "quiet"), [
    ({}, False),
    ({"NODE_RANK": "1"}, True),     # the launch on the second node
    ({"RANK": "3"}, True),          # torchrun's workers
    ({"SLURM_PROCID": "1"}, True),  # srun's tasks
    ({"SLURM_PROCID": "0", "NODE_RANK": "0"}, False),
])
def test_launches_of_rank_above_zero_keep_no_record_or_log_of_their_own(monkeypatch, env, quiet):
    from setr.utils.distributed import QUIET_RANK, quiet_rank_argv

    for var in ("LOCAL_RANK", "RANK", "NODE_RANK", "SLURM_PROCID"):
        monkeypatch.delenv(var, raising=False)
    for var, value in env.items():
        monkeypatch.setenv(var, value)
    argv = ["src/train.py", "trainer=ddp", "hydra.run.dir=/shared/run"]
    assert quiet_rank_argv(argv) == ([*argv, *QUIET_RANK] if quiet else argv)
    assert quiet_rank_argv([*argv, *QUIET_RANK]) == [*argv, *QUIET_RANK]  # Lightning's children have them already
    assert quiet_rank_argv(["src/train.py", "-m", "seed=1,2"]) == ["src/train.py", "-m", "seed=1,2"]


@pytest.mark.parametrize(("env", "job"), [
    ({"SLURM_JOB_ID": "4242"}, "4242"),
    ({"SLURM_JOB_ID": "4250", "SLURM_ARRAY_JOB_ID": "4242", "SLURM_ARRAY_TASK_ID": "7"}, "4242_7"),
    ({}, None),
    ({"SLURM_JOB_ID": "42; rm -rf /"}, None),
])
def test_requeue_job_id(monkeypatch, env, job):
    from setr.training.preemption import slurm_job_id

    for var in ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID"):
        monkeypatch.delenv(var, raising=False)
    for var, value in env.items():
        monkeypatch.setenv(var, value)
    assert slurm_job_id() == job
