"""logger=wandb without an account: offline run under the run folder with metrics, masks and the full config,
and ``resume=auto`` continuing the same run folder and the same W&B run id."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline import ROOT, last_json, tiny_data

pytestmark = pytest.mark.slow

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
    configs = [r.config for r in records if r.WhichOneof("record_type") == "config"]
    assert configs, "no config record"
    return {_key(i): json.loads(i.value_json) for i in configs[-1].update}


def offline_runs(run_dir: Path) -> list[Path]:
    return sorted((run_dir / "wandb").glob("offline-run-*"))


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


def test_offline_run_has_metrics_masks_and_full_config(first_run):
    proc, run_dir, home = first_run["proc"], first_run["run_dir"], first_run["home"]
    text = proc.stdout + proc.stderr
    assert "Create a W&B account" not in text and "wandb login" not in text
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

    # the full resolved config, not only the module's hyperparameters
    config = final_config(records)
    assert {"data", "model", "optimizer", "trainer", "callbacks", "logger", "paths", "seed"} <= set(config)
    assert config["optimizer"]["lr"] == 0.01 and config["optimizer"]["name"] == "sgd"
    assert config["model"]["encoder"]["arch"]["embed_dim"] == 64 and config["model"]["head"]["name"] == "naive"
    assert config["data"]["crop_size"] == 64 and config["trainer"]["max_steps"] == 2
    assert config["paths"]["output_dir"] == str(run_dir)


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
    records = wandb_records(second / f"run-{run_id}.wandb")
    (run_rec,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert run_rec.run_id == run_id
    rows = [row for row in history(records) if "val/mIoU" in row]
    assert rows and rows[-1]["val/mIoU"] == pytest.approx(metrics["val/mIoU"], abs=1e-6)
    assert rows[-1]["trainer/global_step"] > 2  # logged after the resumed steps, not a replay of the first run
