"""The summary of a ``-m`` sweep: one row per job (status, overrides, final and best score, time, run folder).

A failing job does not end the sweep (:func:`setr.utils.launch.task_wrapper` records it and returns); at the end
:class:`SweepSummary`, a Hydra callback (``conf/hydra/default.yaml``), prints the table and writes
``<sweep dir>/summary.csv``; the process then exits non-zero when any job failed. Each job leaves its status in
``<job dir>/job_status.json`` (written in the job's own process, which under the submitit launchers is another
process or machine than the one that ends the sweep): the summary is read back from the job folders.
"""

from __future__ import annotations

import csv
import json
import logging
import time
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback

log = logging.getLogger("setr")

STATUS_FILE = "job_status.json"
COLUMNS = ("job", "status", "overrides", "final", "best", "time_s", "reason", "run_dir")

# jobs of the sweeps this process ran that failed (what setr.utils.launch.launch turns into its exit code)
FAILED: list[dict[str, Any]] = []


def _output_dir() -> Path | None:
    try:
        from hydra.core.hydra_config import HydraConfig

        return Path(HydraConfig.get().runtime.output_dir)
    except Exception:
        return None


def in_multirun() -> bool:
    """True inside a job of a ``-m`` sweep (Hydra's multirun mode)."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        return HydraConfig.get().mode == RunMode.MULTIRUN
    except Exception:
        return False


def record_failure(reason: str, error: BaseException | None = None) -> None:
    """Write ``job_status.json`` (status ``failed`` and the one-line reason) into the current job's folder."""
    out = _output_dir()
    if out is None:
        return
    import traceback

    status = {"status": "failed", "reason": reason}
    if error is not None:
        status["traceback"] = "".join(traceback.format_exception(error))
    out.mkdir(parents=True, exist_ok=True)
    (out / STATUS_FILE).write_text(json.dumps(status, indent=2) + "\n")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


class SweepSummary(Callback):
    """Hydra callback: times each job and records its status in its folder; lists every job at the end of the
    sweep (console table and ``summary.csv``)."""

    def __init__(self, metric: str = "val/mIoU") -> None:
        self.metric = metric
        self._start: float | None = None

    def on_job_start(self, config: Any, **kwargs: Any) -> None:
        self._start = time.monotonic()

    def on_job_end(self, config: Any, job_return: Any, **kwargs: Any) -> None:
        from hydra.core.utils import JobStatus

        if str(config.hydra.mode) != "RunMode.MULTIRUN":
            return
        out = Path(config.hydra.runtime.output_dir)
        if not out.is_dir():
            return
        status = _read_json(out / STATUS_FILE) or {"status": "ok"}
        if job_return is not None and job_return.status == JobStatus.FAILED and status["status"] == "ok":
            error = job_return._return_value
            status = {"status": "failed", "reason": f"{type(error).__name__}: {str(error).strip().splitlines()[0]}"
                      if str(error).strip() else type(error).__name__}
        status["time_s"] = round(time.monotonic() - self._start, 1) if self._start is not None else None
        status["overrides"] = list(job_return.overrides) if job_return is not None else []
        (out / STATUS_FILE).write_text(json.dumps(status, indent=2) + "\n")

    def on_multirun_end(self, config: Any, **kwargs: Any) -> None:
        sweep = Path(config.hydra.sweep.dir)
        rows = summarize(sweep, self.metric)
        if not rows:
            return
        write_summary(rows, sweep / "summary.csv", self.metric)
        print_summary(rows, self.metric, sweep)
        failed = [r for r in rows if r["status"] != "ok"]
        FAILED.extend({**r, "summary": str(sweep / "summary.csv")} for r in failed)


def _job_dirs(sweep: Path) -> list[Path]:
    dirs = {p.parent.parent for p in sweep.glob("**/.hydra/overrides.yaml")} | {p.parent for p in
                                                                                sweep.glob("**/" + STATUS_FILE)}
    dirs = {d for d in dirs if ".submitit" not in d.parts}

    def key(p: Path) -> tuple:
        rel = p.relative_to(sweep).parts
        return tuple((0, int(x), "") if x.isdigit() else (1, 0, x) for x in rel)

    return sorted(dirs, key=key)


def summarize(sweep: Path, metric: str = "val/mIoU") -> list[dict[str, Any]]:
    """One row per job folder of the sweep."""
    import yaml

    rows = []
    for job in _job_dirs(sweep):
        status = _read_json(job / STATUS_FILE)
        metrics = _read_json(job / "metrics.json")
        overrides = status.get("overrides")
        if overrides is None:
            try:
                overrides = yaml.safe_load((job / ".hydra" / "overrides.yaml").read_text()) or []
            except (OSError, yaml.YAMLError):
                overrides = []
        state = status.get("status") or ("ok" if metrics else "failed")
        reason = status.get("reason") or ("" if state == "ok" else "no result: the job did not finish (killed?)")
        rows.append({
            "job": str(job.relative_to(sweep)),
            "status": state,
            "overrides": " ".join(overrides),
            "final": metrics.get(metric),
            "best": metrics.get(f"{metric}_best"),
            "time_s": status.get("time_s"),
            "reason": reason,
            "run_dir": str(job),
        })
    return rows


def write_summary(rows: list[dict[str, Any]], path: Path, metric: str = "val/mIoU") -> None:
    header = [c if c not in ("final", "best") else f"{metric}{'_best' if c == 'best' else ''}" for c in COLUMNS]
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        for r in rows:
            w.writerow(["" if r[c] is None else r[c] for c in COLUMNS])


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def _varying(rows: list[dict[str, Any]]) -> list[str]:
    """Each job's overrides that not every job shares (the swept ones), as one string per job."""
    lists = [r["overrides"].split(" ") if r["overrides"] else [] for r in rows]
    common = set.intersection(*map(set, lists)) if len(lists) > 1 else set()
    return [" ".join(o for o in ov if o not in common) for ov in lists]


def print_summary(rows: list[dict[str, Any]], metric: str = "val/mIoU", sweep: Path | None = None,
                  width: int = 60) -> None:
    """The table on stdout: one line per job, with the overrides that differ between jobs and, for a failed
    job, its reason (shortened to ``width`` characters; ``summary.csv`` has it whole, and every override)."""
    header = ["job", "status", metric, "best", "time", "overrides"]
    body = []
    for r, swept in zip(rows, _varying(rows)):
        status = r["status"] if r["status"] == "ok" else f"failed: {r['reason']}"
        status = status if len(status) <= width else status[:width - 3] + "..."
        time_s = "-" if r["time_s"] is None else f"{r['time_s']:.0f}s"
        body.append([r["job"], status, _fmt(r["final"]), _fmt(r["best"]), time_s, swept])
    widths = [max(len(str(x)) for x in col) for col in zip(header, *body)]
    lines = ["  ".join(str(x).ljust(w) for x, w in zip(row, widths)).rstrip() for row in [header, *body]]
    ok = sum(r["status"] == "ok" for r in rows)
    where = f" ({sweep}, summary.csv)" if sweep is not None else ""
    print(f"sweep: {ok} of {len(rows)} jobs ok{where}", flush=True)
    print("\n".join(lines), flush=True)
