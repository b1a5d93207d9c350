"""The pre-flight dataset check (``data.check``): a broken dataset stops in seconds, before training starts."""

from __future__ import annotations

import logging
import re
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

import fake_datasets as fake
from pipeline import CONF
from setr.data import build_dataset
from setr.data.check import CHECK_LEVELS, check_dataset, check_level
from setr.data.folder import FolderDataset
from setr.data.synthetic import SyntheticShapes
from setr.errors import DataError, SETRConfigError


@pytest.fixture
def folder(tmp_path) -> Path:
    return fake.make_folder(tmp_path / "f", n_train=3, n_val=1)


def _ds(root: Path, **kw) -> FolderDataset:
    return build_dataset("folder", "train", root=str(root), check="off", **kw)


def _one_line(excinfo) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg, msg
    return msg


# ------------------------------------------------------------------------------------------ config
def test_every_data_config_has_the_check_key():
    for path in sorted((CONF / "data").glob("*.yaml")):
        doc = yaml.safe_load(path.read_text())
        if path.stem == "pascal_context_59":  # inherits pascal_context
            assert "check" not in doc
            continue
        assert doc.get("check") == "quick", path.name
        line = next(ln for ln in path.read_text().splitlines() if ln.startswith("check:"))
        assert "#" in line and all(level in line for level in CHECK_LEVELS), line


@pytest.mark.parametrize("value, level", [("quick", "quick"), ("full", "full"), ("off", "off"),
                                          (False, "off"), (None, "quick")])
def test_check_level_values(value, level):
    assert check_level(value) == level


@pytest.mark.parametrize("value", ["fast", "yes", 1, "FULL "])
def test_bad_check_value_is_one_line_naming_the_key(value):
    from setr.training.datamodule import SegDataModule

    with pytest.raises(SETRConfigError, match=r"^data\.check: .*quick, full, off") as e:
        SegDataModule({"name": "synthetic", "check": value, "batch_size": 2})
    _one_line(e)


# ------------------------------------------------------------------------------------------ failure kinds
def _expect(ds, level: str, path: Path, what: str) -> None:
    with pytest.raises(DataError, match=re.escape(str(path)) + ".*" + what) as e:
        check_dataset(ds, level, progress=False)
    _one_line(e)


@pytest.mark.parametrize("level", ["quick", "full"])
def test_missing_file(folder, level):
    ds = _ds(folder)
    (folder / "masks" / "train" / "train_001.png").unlink()  # gone after the dataset was listed
    _expect(ds, level, folder / "masks" / "train" / "train_001.png", "not found")


@pytest.mark.parametrize("level", ["quick", "full"])
def test_unreadable_header(folder, level):
    bad = folder / "images" / "train" / "train_002.png"
    bad.write_bytes(b"not an image at all")
    _expect(_ds(folder), level, bad, "unreadable")


@pytest.mark.parametrize("level", ["quick", "full"])
def test_size_mismatch(folder, level):
    mask = folder / "masks" / "train" / "train_000.png"
    Image.fromarray(np.zeros((fake.H, fake.W + 8), np.uint8)).save(mask)
    _expect(_ds(folder), level, mask, f"label size {fake.W + 8}x{fake.H} differs from image")


@pytest.mark.parametrize("level", ["quick", "full"])
def test_mask_with_colour_channels(folder, level):
    mask = folder / "masks" / "train" / "train_001.png"
    Image.open(mask).convert("RGB").save(mask)
    _expect(_ds(folder), level, mask, "mode RGB")


def test_truncated_pixels_and_bad_label_values_need_full(folder):
    """Headers intact: quick passes, full decodes and finds the problem (naming the file)."""
    truncated = fake.truncate(folder / "images" / "train" / "train_001.png")
    ds = _ds(folder)
    assert check_dataset(ds, "quick", progress=False).checked == 3
    _expect(ds, "full", truncated, "truncated")

    other = fake.make_folder(folder.parent / "g", n_train=2, n_val=1)
    mask = other / "masks" / "train" / "train_001.png"
    raw = np.asarray(Image.open(mask)).copy()
    raw[2:4, 2:4] = 7  # 3 classes: 7 is neither a class nor the ignore value
    Image.fromarray(raw).save(mask)
    ds = _ds(other)
    check_dataset(ds, "quick", progress=False)
    _expect(ds, "full", mask, r"label values \[7\]")


def test_full_uses_the_datasets_own_label_mapping(tmp_path):
    """ADE20K stores 1..150 (0 = unlabelled): 150 is valid there, 151 is not; only full reads values."""
    root = fake.make_ade20k(tmp_path / "ade", n_train=2, n_val=1)
    ds = build_dataset("ade20k", "train", root=str(root), check="full")  # 0 and 150 in the fake labels: fine
    assert len(ds) == 2
    label = Path(ds.samples[1][1])
    raw = np.asarray(Image.open(label)).copy()
    raw[0, 0] = 151
    Image.fromarray(raw).save(label)
    assert len(build_dataset("ade20k", "train", root=str(root), check="quick")) == 2
    with pytest.raises(DataError, match=re.escape(label.name) + r".*\[151\]"):
        build_dataset("ade20k", "train", root=str(root), check="full")


def test_off_checks_nothing(folder):
    for name in ("train_000.png", "train_001.png"):
        (folder / "images" / "train" / name).write_bytes(b"garbage")
    ds = build_dataset("folder", "train", root=str(folder), check="off")
    assert len(ds) == 3 and check_dataset(ds, "off", progress=False).checked == 0


def test_first_problem_stops_in_sample_order(folder):
    for name in ("train_002.png", "train_001.png"):
        (folder / "images" / "train" / name).write_bytes(b"garbage")
    with pytest.raises(DataError, match=r"train_001\.png"):
        build_dataset("folder", "train", root=str(folder))


# ------------------------------------------------------------------------------------------ skip_bad
@pytest.mark.parametrize("level, kept", [("quick", 2), ("full", 1)])
def test_skip_bad_skips_and_counts_what_the_check_finds(tmp_path, level, kept, caplog):
    root = fake.make_folder(tmp_path / "f", n_train=4, n_val=1)
    (root / "images" / "train" / "train_000.png").write_bytes(b"garbage")         # quick finds it
    mask = root / "masks" / "train" / "train_001.png"
    Image.fromarray(np.full((fake.H, fake.W), 9, np.uint8)).save(mask)          # bad values: full only
    (root / "masks" / "train" / "train_003.png").unlink()                         # unmatched: when listing
    with caplog.at_level(logging.INFO, logger="setr"):
        ds = build_dataset("folder", "train", root=str(root), skip_bad=True, check=level)
    assert len(ds) == kept and ds.samples[-1][0].name == "train_002.png"
    assert len(ds.skipped) == 4 - kept
    assert any("train_000.png" in s for s in ds.skipped) and any("train_003" in s for s in ds.skipped)
    assert (level == "full") == any("train_001.png" in s for s in ds.skipped)
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("data check"))
    assert re.search(rf"{level}: 3 train samples .* in \d+\.\d\d s; {4 - kept} skipped", line), line


# ------------------------------------------------------------------------------------------ reporting
def test_log_line_and_no_progress_bar_off_a_terminal(folder, caplog, capsys):
    with caplog.at_level(logging.INFO, logger="setr"):
        result = check_dataset(_ds(folder), "full")
    assert result.checked == 3 and result.skipped == 0 and result.seconds >= 0
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("data check")]
    assert len(lines) == 1 and re.search(r"full: 3 train samples .* in \d+\.\d\d s", lines[0]), lines
    out = capsys.readouterr()
    assert out.out == "" and out.err == ""  # no bar (and no leftovers of one) when not on a terminal


def test_synthetic_samples_have_nothing_to_check():
    ds = SyntheticShapes(num_samples=100_000, image_size=16)
    t0 = time.perf_counter()
    result = check_dataset(ds, "full", progress=False)
    assert result.checked == 0 and time.perf_counter() - t0 < 0.5


def test_data_module_setup_runs_the_check(tmp_path):
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from setr.training.datamodule import SegDataModule

    root = fake.make_folder(tmp_path / "f", n_train=2, n_val=1)
    mask = root / "masks" / "val" / "val_000.png"
    Image.fromarray(np.full((fake.H, fake.W), 5, np.uint8)).save(mask)
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF)):
        cfg = compose("train", overrides=["data=folder", f"data.root={root}", "data.num_classes=3"])
    data = OmegaConf.to_container(cfg.data, resolve=True)
    assert data["check"] == "quick"
    SegDataModule(data, seed=0).setup("fit")  # quick: values are not read
    with pytest.raises(DataError, match=re.escape(str(mask)) + r".*\[5\]"):
        SegDataModule({**data, "check": "full"}, seed=0).setup("fit")
