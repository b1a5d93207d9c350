"""Two nodes simulated on this machine: two launches of src/train.py with ``trainer.num_nodes=2
trainer.devices=1``, NODE_RANK 0 / 1 and the same MASTER_ADDR / MASTER_PORT (what a multi-node launcher exports
on each node), DDP over gloo on CPU. They train together into one run folder, and the confusion matrix of their
validation equals a single-process src/eval.py of the final checkpoint."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys

import pytest
from test_ddp import DATA, TRAIN, read_confusion

from pipeline import ROOT, last_json, run_entry

HANG_GUARD_S = 1200


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_nodes_train_together_and_score_like_one_process(tmp_path):
    run_dir = tmp_path / "run"
    log_dir = tmp_path / "logs"
    cmd = [sys.executable, str(ROOT / "src" / "train.py"), "trainer=ddp", "trainer.accelerator=cpu",
           "trainer.num_nodes=2", "trainer.devices=1", *TRAIN, f"paths.log_dir={log_dir}", f"hydra.run.dir={run_dir}"]
    port = str(free_port())
    procs = []
    with contextlib.ExitStack() as files:
        for node in (0, 1):
            env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "LOCAL_RANK", "RANK"))}
            env.update({"NODE_RANK": str(node), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port,
                        "WORLD_SIZE": "2", "PYTHONUNBUFFERED": "1", "WANDB_MODE": "offline"})
            out = files.enter_context(open(tmp_path / f"node{node}.out", "w"))
            err = files.enter_context(open(tmp_path / f"node{node}.err", "w"))
            procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=err, stdin=subprocess.DEVNULL))
        try:
            for proc in procs:
                proc.wait(timeout=HANG_GUARD_S)
        finally:
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
    outs = [((tmp_path / f"node{n}.out").read_text(), (tmp_path / f"node{n}.err").read_text()) for n in (0, 1)]
    for proc, (_, err) in zip(procs, outs):
        assert proc.returncode == 0, err[-3000:]
    assert "Starting with 2 processes" in outs[0][1] + outs[0][0]

    # one run folder: node 0's record and log; node 1 wrote no .hydra, log or folder of its own
    assert not log_dir.exists() or not any(log_dir.rglob("*.yaml"))
    assert sorted(p.name for p in run_dir.glob("*.log")) == ["train.log"]
    assert (run_dir / "train.log").read_text().count("keeping BatchNorm on CPU") == 1, "node 1 wrote to it too"
    assert sorted(p.name for p in (run_dir / ".hydra").iterdir()) == ["config.yaml", "hydra.yaml", "overrides.yaml"]
    assert not [ln for ln in outs[1][0].splitlines() if ln.startswith("{")], "node 1 printed a final metrics line"
    ddp = last_json(subprocess.CompletedProcess(cmd, 0, outs[0][0], ""))
    assert ddp["global_step"] == 2

    ckpt = run_dir / "checkpoints" / "last.ckpt"
    eval_dir = tmp_path / "eval"
    single = last_json(run_entry("eval.py", f"ckpt_path={ckpt}", *DATA, "trainer.accelerator=cpu",
                                 "extras.print_config=false", f"hydra.run.dir={eval_dir}",
                                 log_dir=tmp_path / "eval_logs"))
    assert read_confusion(run_dir / "val_confusion.csv") == read_confusion(eval_dir / "val_confusion.csv")
    assert ddp["val/mIoU"] == pytest.approx(single["val/mIoU"], abs=1e-6)
