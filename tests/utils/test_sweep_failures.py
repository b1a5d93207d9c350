"""A -m sweep with a failing job: the other jobs still run, the summary (console table and summary.csv) lists
every job with its status, and the sweep exits non-zero. Basic launcher and submitit's local launcher."""

from __future__ import annotations

import csv
import json

import pytest

from pipeline import run_entry, tiny_data

SMALL = [
    "model/encoder=vit_test",
    *tiny_data(8, 4),
    "trainer.max_steps=2",
    "trainer.val_check_interval=2",
    "extras.print_config=false",
]


def check_sweep(tmp_path, proc, failing: str, reason: str) -> None:
    assert proc.returncode == 1, proc.stderr[-3000:]
    (sweep,) = (tmp_path / "train" / "multiruns").iterdir()
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir() and p.name.isdigit()) == ["0", "1"]
    rows = list(csv.DictReader((sweep / "summary.csv").read_text().splitlines()))
    assert [r["job"] for r in rows] == ["0", "1"] and [r["status"] for r in rows] == ["ok", "failed"]
    ok, failed = rows
    metrics = json.loads((sweep / "0" / "metrics.json").read_text())
    assert float(ok["val/mIoU"]) == pytest.approx(metrics["val/mIoU"], abs=1e-9)
    assert float(ok["val/mIoU_best"]) == pytest.approx(metrics["val/mIoU_best"], abs=1e-9)
    assert float(ok["time_s"]) > 0 and ok["run_dir"] == str(sweep / "0") and ok["reason"] == ""
    assert failing in failed["overrides"].split() and reason in failed["reason"], failed
    assert failed["run_dir"] == str(sweep / "1") and not (sweep / "1" / "metrics.json").exists()
    # the console: the table, then one error line for the sweep
    assert "sweep: 1 of 2 jobs ok" in proc.stdout
    assert proc.stderr.rstrip().splitlines()[-1] == f"error: sweep: 1 job(s) failed (1); see {sweep / 'summary.csv'}"


@pytest.mark.slow
def test_basic_sweep_goes_on_past_a_failing_job(tmp_path):
    # optimizer.lr=-1 is refused by the job's own config check: that job fails, the sweep goes on
    proc = run_entry("train.py", "-m", "optimizer.lr=0.01,-1", *SMALL, log_dir=tmp_path, check=False)
    check_sweep(tmp_path, proc, "optimizer.lr=-1", "optimizer.lr: must be a positive number")
    assert any(ln.startswith("error: job 1 (") and "the sweep goes on" in ln for ln in proc.stderr.splitlines())


@pytest.mark.slow
def test_submitit_local_sweep_goes_on_past_a_job_failing_in_training(tmp_path):
    # lr=1e6 diverges while training (in the job's own process)
    proc = run_entry("train.py", "-m", "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=5",
                     "optimizer.lr=0.01,1e6", *SMALL, "trainer.val_check_interval=4", "trainer.max_steps=4",
                     log_dir=tmp_path, check=False, timeout=1200)
    check_sweep(tmp_path, proc, "optimizer.lr=1000000.0", "diverged")


def test_summary_lists_a_job_that_left_no_result_as_failed(tmp_path, capsys):
    """A job killed from outside (out of memory, node lost) writes no status: the summary still lists it."""
    from setr.utils.sweep_summary import print_summary, summarize, write_summary

    for job, overrides in (("0", ["seed=1", "trainer.max_steps=2"]), ("1", ["seed=2", "trainer.max_steps=2"])):
        (tmp_path / job / ".hydra").mkdir(parents=True)
        (tmp_path / job / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    (tmp_path / "0" / "metrics.json").write_text(json.dumps({"val/mIoU": 0.5, "val/mIoU_best": 0.6}))
    (tmp_path / "0" / "job_status.json").write_text(json.dumps({"status": "ok", "time_s": 3.0,
                                                                "overrides": ["seed=1", "trainer.max_steps=2"]}))
    rows = summarize(tmp_path)
    assert [(r["job"], r["status"], r["final"], r["best"]) for r in rows] == [("0", "ok", 0.5, 0.6),
                                                                              ("1", "failed", None, None)]
    assert "did not finish" in rows[1]["reason"] and rows[1]["overrides"] == "seed=2 trainer.max_steps=2"
    write_summary(rows, tmp_path / "summary.csv")
    assert (tmp_path / "summary.csv").read_text().splitlines()[0] == \
        "job,status,overrides,val/mIoU,val/mIoU_best,time_s,reason,run_dir"
    print_summary(rows)
    table = capsys.readouterr().out.splitlines()
    assert table[0] == "sweep: 1 of 2 jobs ok"
    assert table[2].split()[:6] == ["0", "ok", "0.5000", "0.6000", "3s", "seed=1"]  # only the swept override
    assert table[3].split()[:2] == ["1", "failed:"]
