"""logger=wandb without an account: offline run under the run folder with metrics, masks, the confusion chart and
the full config, the CSV history beside it, the `wandb sync` line at the end, and ``resume=auto`` continuing the
same run folder and the same W&B run id."""

from __future__ import annotations

import csv
import json
import os
import struct
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from pipeline import ROOT, last_json, tiny_data

OVERRIDES = [
    "model/encoder=vit_test",
    "model/head=naive",
    *tiny_data(8, 4),
    "trainer.val_check_interval=2",
    "extras.print_config=false",
    "callbacks.wandb_samples.num_samples=2",  # the default callbacks otherwise
    "logger=wandb",
]


def run_train(*args: str, log_dir: Path, home: Path) -> subprocess.CompletedProcess:
    """src/train.py as a new user would run it: no W&B variables at all (no API key, no WANDB_MODE), a HOME
    with no ~/.netrc or W&B settings, and no stdin to answer a login prompt."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(HOME=str(home), PYTHONUNBUFFERED="1")
    cmd = [sys.executable, str(ROOT / "src" / "train.py"), *OVERRIDES, *args, f"paths.log_dir={log_dir}"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=1200)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


def wandb_records(path: Path) -> list:
    """The records of an offline run's ``run-<id>.wandb`` file: W&B's LevelDB-style log (a 7-byte header, then
    32 KiB blocks of chunks, each with a 7-byte header: crc32, length, type FULL/FIRST/MIDDLE/LAST) of
    ``wandb_internal_pb2.Record`` protobufs. wandb 0.31 no longer ships a Python reader for it."""
    from wandb.proto import wandb_internal_pb2 as pb

    raw = path.read_bytes()
    assert raw[:4] == b":W&B", f"{path}: not a W&B transaction log"
    block, pos, chunks, out = 32768, 7, b"", []
    while pos + 7 <= len(raw):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a chunk header is padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", raw[pos:pos + 7])
        if length == 0 and kind == 0:  # zero padding up to the end of the block
            pos += left
            continue
        chunks += raw[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST: a whole record
            rec = pb.Record()
            rec.ParseFromString(chunks)
            out.append(rec)
            chunks = b""
    return out


def _key(item) -> str:
    return item.key or "/".join(item.nested_key)


def history(records) -> list[dict]:
    return [{_key(i): json.loads(i.value_json) for i in r.history.item} for r in records
            if r.WhichOneof("record_type") == "history"]


def final_config(records) -> dict:
    """The run config: each config record updates some keys (a custom chart adds ``_wandb/visualize/<key>``)."""
    configs = [r.config for r in records if r.WhichOneof("record_type") == "config"]
    assert configs, "no config record"
    return {_key(i): json.loads(i.value_json) for c in configs for i in c.update}


def offline_runs(run_dir: Path) -> list[Path]:
    return sorted((run_dir / "wandb").glob("offline-run-*"))


def sync_lines(proc: subprocess.CompletedProcess) -> list[str]:
    return [ln for ln in (proc.stdout + proc.stderr).splitlines() if "wandb sync" in ln]


def synced_paths(line: str) -> list[Path]:
    """The folders a `wandb: offline run saved; upload it with: wandb sync <folder>...` line names."""
    return [Path(p) for p in line.split("wandb sync ", 1)[1].split()]


def chart_rows(offline: Path, row: dict, key: str) -> list:
    """The ``[Actual, Predicted, nPredictions]`` rows of the table a confusion chart logged under ``key``."""
    assert row[f"{key}_table/_type"] == "table-file"
    table = json.loads((offline / "files" / row[f"{key}_table/path"]).read_text())
    assert table["columns"] == ["Actual", "Predicted", "nPredictions"]
    return table["data"]


def chart_panel(records, key: str) -> dict:
    """The panel W&B draws for the custom chart logged under ``key`` (the run config's ``_wandb.visualize``)."""
    for r in reversed(records):
        if r.WhichOneof("record_type") == "config":
            for item in r.config.update:
                if list(item.nested_key) == ["_wandb", "visualize", key]:
                    return json.loads(item.value_json)
    raise AssertionError(f"no chart panel for {key}")


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("wandb")
    home = tmp / "home"
    home.mkdir()
    log_dir = tmp / "logs"
    proc = run_train("trainer.max_steps=2", log_dir=log_dir, home=home)
    runs = sorted((log_dir / "train" / "runs").iterdir())
    assert len(runs) == 1
    return {"proc": proc, "log_dir": log_dir, "home": home, "run_dir": runs[0]}


@pytest.mark.slow
def test_offline_run_has_metrics_masks_and_full_config(first_run):
    proc, run_dir, home = first_run["proc"], first_run["run_dir"], first_run["home"]
    text = proc.stdout + proc.stderr
    assert "Create a W&B account" not in text and "wandb login" not in text
    assert "anonymous setting" not in text  # Lightning's anonymous=None no longer reaches wandb.init
    assert not (home / ".netrc").exists()

    run_id = (run_dir / "wandb_run_id.txt").read_text().strip()
    (offline,) = offline_runs(run_dir)
    assert offline.name.endswith(f"-{run_id}")
    records = wandb_records(offline / f"run-{run_id}.wandb")
    (run_rec,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert run_rec.run_id == run_id and run_rec.project == "setr"

    # the metrics: val/mIoU in the run's history equals the run's own final metrics
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics == last_json(proc)
    rows = history(records)
    miou = [row["val/mIoU"] for row in rows if "val/mIoU" in row]
    assert miou and miou[-1] == pytest.approx(metrics["val/mIoU"], abs=1e-6)
    assert any("val/IoU/background" in row for row in rows)

    # the masks: 2 validation images, each with predicted and ground-truth masks stored under files/
    (samples,) = [row for row in rows if "val/samples/_type" in row]
    assert samples["val/samples/_type"] == "images/separated" and samples["val/samples/count"] == 2
    masks = samples["val/samples/all_masks"]
    assert len(masks) == 2
    for entry in masks:
        assert set(entry) == {"predictions", "ground_truth"}
        for mask in entry.values():
            png = offline / "files" / mask["path"]
            assert mask["_type"] == "mask" and png.is_file()
            values = set(np.unique(np.asarray(Image.open(png))).tolist())
            assert values <= {0, 1, 2, 3, 255}, values
    assert len(list((offline / "files" / "media" / "images" / "val").glob("samples_*.png"))) == 2

    # the confusion matrix of the last validation, as an image
    (confusion,) = [row for row in rows if "val/confusion/_type" in row]
    assert confusion["val/confusion/_type"] == "image-file"
    assert (offline / "files" / confusion["val/confusion/path"]).is_file()

    # ... and as W&B's interactive confusion chart of the same pixel counts as <run dir>/val_confusion.csv
    (chart,) = [row for row in rows if "val/confusion_matrix_table/_type" in row]
    assert chart["trainer/global_step"] == 2
    with open(run_dir / "val_confusion.csv", newline="") as f:
        header, *lines = list(csv.reader(f))
    names = header[1:]
    assert len(names) == 4
    expected = [[line[0], names[j], int(v)] for line in lines for j, v in enumerate(line[1:])]
    assert chart_rows(offline, chart, "val/confusion_matrix") == expected
    panel = chart_panel(records, "val/confusion_matrix")
    assert panel["panel_config"]["panelDefId"] == "wandb/confusion_matrix/v1"
    assert panel["panel_config"]["fieldSettings"] == {"Actual": "Actual", "Predicted": "Predicted",
                                                      "nPredictions": "nPredictions"}

    # logger=wandb keeps the CSV history (resume and the reports read it)
    with open(run_dir / "csv" / "metrics.csv", newline="") as f:
        history_rows = list(csv.DictReader(f))
    assert float([r["val/mIoU"] for r in history_rows if r.get("val/mIoU")][-1]) == pytest.approx(metrics["val/mIoU"])

    # the run ends with one line: the `wandb sync` command of its offline folder
    (line,) = sync_lines(proc)
    assert line.endswith(f"upload it with: wandb sync {offline}")
    assert synced_paths(line) == [offline] and offline.is_dir()

    # the full resolved config, not only the module's hyperparameters
    config = final_config(records)
    assert {"data", "model", "optimizer", "trainer", "callbacks", "logger", "paths", "seed"} <= set(config)
    assert config["optimizer"]["lr"] == 0.01 and config["optimizer"]["name"] == "sgd"
    assert config["model"]["encoder"]["arch"]["embed_dim"] == 64 and config["model"]["head"]["name"] == "naive"
    assert config["data"]["crop_size"] == 64 and config["trainer"]["max_steps"] == 2
    assert config["paths"]["output_dir"] == str(run_dir)


@pytest.mark.slow
def test_resume_auto_continues_same_run_dir_and_wandb_run(first_run):
    log_dir, home, run_dir = first_run["log_dir"], first_run["home"], first_run["run_dir"]
    run_id = (run_dir / "wandb_run_id.txt").read_text().strip()
    proc = run_train("resume=auto", "trainer.max_steps=4", log_dir=log_dir, home=home)

    assert sorted((log_dir / "train" / "runs").iterdir()) == [run_dir]  # no new run folder
    assert "resuming from" in (run_dir / "train.log").read_text()
    metrics = last_json(proc)
    assert metrics["global_step"] == 4
    assert json.loads((run_dir / "metrics.json").read_text())["global_step"] == 4
    assert (run_dir / "wandb_run_id.txt").read_text().strip() == run_id

    # offline W&B writes each (re)start to its own folder; both carry the run id, so `wandb sync` merges them
    first, second = offline_runs(run_dir)
    assert first.name.endswith(f"-{run_id}") and second.name.endswith(f"-{run_id}")
    (line,) = sync_lines(proc)  # the sync line names both, in order (wandb sync skips one already uploaded)
    assert synced_paths(line) == [first, second]
    records = wandb_records(second / f"run-{run_id}.wandb")
    (run_rec,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert run_rec.run_id == run_id
    rows = [row for row in history(records) if "val/mIoU" in row]
    assert rows and rows[-1]["val/mIoU"] == pytest.approx(metrics["val/mIoU"], abs=1e-6)
    assert rows[-1]["trainer/global_step"] > 2  # logged after the resumed steps, not a replay of the first run


# ---- fast checks: no training run --------------------------------------------------------------------------------

@pytest.mark.parametrize(("group", "loggers"), [
    ("csv", {"csv"}),
    ("wandb", {"csv", "wandb"}),
    ("tensorboard", {"csv", "tensorboard"}),
    ("many", {"csv", "tensorboard", "wandb"}),
    ("[csv,tensorboard]", {"csv", "tensorboard"}),
])
def test_every_logger_choice_keeps_the_csv_history(group, loggers):
    """csv/metrics.csv is what resume and the reports read: logger=wandb or logger=tensorboard keep it."""
    from conftest import _compose

    cfg = _compose((f"logger={group}",), "train")
    assert set(cfg.logger) == loggers
    assert cfg.logger.csv._target_ == "setr.training.loggers.CSVLogger" and cfg.logger.csv.name == "csv"


def test_confusion_chart_rows_of_a_known_matrix():
    from setr.training.loggers import confusion_chart_rows

    cm = np.array([[5, 1, 0], [0, 3, 2], [4, 0, 7]])
    names = ["road", "sky", "car"]
    assert confusion_chart_rows(cm, names, max_rows=100) == [  # every cell, row-major, as wandb.plot does
        ["road", "road", 5], ["road", "sky", 1], ["road", "car", 0],
        ["sky", "road", 0], ["sky", "sky", 3], ["sky", "car", 2],
        ["car", "road", 4], ["car", "sky", 0], ["car", "car", 7]]
    # more cells than a W&B table holds: the non-zero ones, then the largest counts, still row-major
    assert confusion_chart_rows(cm, names, max_rows=6) == [
        ["road", "road", 5], ["road", "sky", 1], ["sky", "sky", 3], ["sky", "car", 2], ["car", "road", 4],
        ["car", "car", 7]]
    assert confusion_chart_rows(cm, names, max_rows=4) == [
        ["road", "road", 5], ["sky", "sky", 3], ["car", "road", 4], ["car", "car", 7]]
    with pytest.raises(ValueError, match="confusion matrix for 2 class names"):
        confusion_chart_rows(cm, names[:2], max_rows=100)


@pytest.fixture
def offline_wandb(tmp_path, monkeypatch):
    """An offline W&B run of the project's WandbLogger under ``tmp_path``: no account, nothing sent anywhere."""
    for k in [k for k in os.environ if k.startswith("WANDB_")]:
        monkeypatch.delenv(k)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CONSOLE", "off")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    from setr.training.loggers import WandbLogger

    logger = WandbLogger(project="setr", save_dir=str(tmp_path), offline=True, id="tiny0001")
    run = logger.experiment
    try:
        yield logger, run
    finally:
        run.finish()


def test_confusion_chart_is_logged_from_the_aggregated_matrix(offline_wandb):
    import torch

    from setr.training.loggers import log_wandb_confusion_chart

    logger, run = offline_wandb
    offline = Path(run.settings.sync_dir)
    cm = torch.tensor([[5, 1], [0, 3]])
    assert log_wandb_confusion_chart([logger], cm, ["road", "sky"], prefix="test", step=7) == 1
    run.finish()

    records = wandb_records(offline / "run-tiny0001.wandb")
    (row,) = [r for r in history(records) if "test/confusion_matrix_table/_type" in r]
    assert row["trainer/global_step"] == 7
    assert chart_rows(offline, row, "test/confusion_matrix") == [
        ["road", "road", 5], ["road", "sky", 1], ["sky", "road", 0], ["sky", "sky", 3]]
    config = chart_panel(records, "test/confusion_matrix")["panel_config"]
    assert config["panelDefId"] == "wandb/confusion_matrix/v1"
    assert config["stringSettings"] == {"title": "test confusion matrix (pixels, step 7)"}


def test_no_wandb_logger_logs_nothing():
    from setr.training.loggers import log_wandb_confusion_chart

    assert log_wandb_confusion_chart([SimpleNamespace()], np.eye(2), ["a", "b"]) == 0


def test_sync_line_names_the_offline_folder_of_this_run(offline_wandb, tmp_path, caplog):
    import logging

    from setr.training.loggers import log_wandb_run_line, wandb_run_line

    _, run = offline_wandb
    here = Path(run.settings.sync_dir)
    assert here.is_dir() and here.parent == tmp_path / "wandb" and here.name.startswith("offline-run-")
    assert wandb_run_line() == f"wandb: offline run saved; upload it with: wandb sync {here}"  # the active run
    with caplog.at_level(logging.INFO, logger="setr"):
        log_wandb_run_line()
    assert [r.getMessage() for r in caplog.records] == [wandb_run_line()]

    # a resumed run: the earlier folders of the same id first (wandb sync uploads them in order), no other run's
    (tmp_path / "wandb" / "offline-run-20000101_000000-tiny0001").mkdir()
    (tmp_path / "wandb" / "offline-run-20000101_000001-other001").mkdir()
    assert synced_paths(wandb_run_line()) == [tmp_path / "wandb" / "offline-run-20000101_000000-tiny0001", here]


def test_sync_line_online_disabled_and_no_run(tmp_path, monkeypatch):
    from setr.training.loggers import wandb_run_line

    online = SimpleNamespace(id="abc", offline=False, url="https://wandb.ai/me/setr/runs/abc",
                             settings=SimpleNamespace(mode="online", sync_dir=str(tmp_path)))
    assert wandb_run_line(online) == "wandb: run at https://wandb.ai/me/setr/runs/abc"
    disabled = SimpleNamespace(id="abc", offline=False, url=None,
                               settings=SimpleNamespace(mode="disabled", sync_dir=str(tmp_path)))
    assert wandb_run_line(disabled) is None
    monkeypatch.setitem(sys.modules, "wandb", SimpleNamespace(run=None))
    assert wandb_run_line() is None
