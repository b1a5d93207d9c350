"""``data=folder`` at other image sizes: ``data.crop_size`` alone sets the rescales and the sliding windows
(``setr.scale_for_crop``), and the pre-flight check says in one line when the crop is larger than the images."""

from __future__ import annotations

import logging

import pytest
from omegaconf import OmegaConf

import fake_datasets as fake
from conftest import _compose
from setr import scale_for_crop, slide_stride
from setr.data import build_dataset
from setr.training.datamodule import SegDataModule

HINT = "is larger than your images"


def _data(*overrides: str) -> dict:
    cfg = _compose(("data=folder", "data.num_classes=3", "data.num_workers=0", *overrides), "train")
    return OmegaConf.to_container(cfg.data, resolve=True)


def _scales(data: dict) -> dict:
    return {"train": data["train_pipeline"][0]["img_scale"], "test": data["test_scale"],
            "val": data["val_pipeline"][0]["img_scale"], "window": data["inference"]["crop_size"],
            "stride": data["inference"]["stride"], "cat_crop": data["train_pipeline"][1]["height"]}


# ------------------------------------------------------------------------------------------ the resolver
def test_scale_for_crop_keeps_the_pascal_context_ratio():
    assert scale_for_crop(480) == [520, 520]  # the recipe's own numbers
    assert scale_for_crop(256) == [277, 277]  # 256 * 520 / 480 = 277.3
    assert scale_for_crop([256, 320]) == [277, 347]  # 346.7 rounds up
    assert scale_for_crop(96) == [104, 104] and scale_for_crop(64) == [69, 69]
    assert scale_for_crop(6) == [7, 7], "halves round up (6.5), not to even"
    assert slide_stride(480) == 320


def test_the_resolver_works_in_any_config():
    cfg = OmegaConf.create({"crop": [256, 320], "scale": "${setr.scale_for_crop:${crop}}"})
    assert OmegaConf.to_container(cfg, resolve=True)["scale"] == [277, 347]
    OmegaConf.resolve(cfg)  # in place, as `--cfg job --resolve`: a plain list would be refused
    assert cfg.scale == [277, 347]
    folder = _compose(("data=folder", "data.num_classes=3", "data.crop_size=64"), "train")
    OmegaConf.resolve(folder.data)
    assert folder.data.test_scale == [69, 69] and folder.data.train_pipeline[0].img_scale == [69, 69]


# ------------------------------------------------------------------------------------------ conf/data/folder.yaml
def test_folder_defaults_are_unchanged_at_crop_480():
    assert _scales(_data()) == {"train": [520, 520], "test": [520, 520], "val": [520, 520], "window": 480,
                                "stride": 320, "cat_crop": 480}


def test_crop_size_alone_sets_scales_and_windows():
    assert _scales(_data("data.crop_size=256")) == {"train": [277, 277], "test": [277, 277], "val": [277, 277],
                                                    "window": 256, "stride": 170, "cat_crop": 256}
    ms = _compose(("data=folder", "data.num_classes=3", "data.crop_size=256", "protocol=ms"), "train")
    assert list(ms.data.inference.img_scale) == [277, 277] and ms.data.inference.min_short == 256


def test_a_key_set_on_the_command_line_wins():
    got = _scales(_data("data.crop_size=256", "data.test_scale=[600,600]", "data.train_pipeline.0.img_scale=[300,300]",
                        "data.inference.stride=100"))
    assert got == {"train": [300, 300], "test": [600, 600], "val": [600, 600], "window": 256, "stride": 100,
                   "cat_crop": 256}
    # each override replaces its key alone: the others still follow the crop
    assert _scales(_data("data.crop_size=256", "data.test_scale=[600,600]"))["train"] == [277, 277]


# ------------------------------------------------------------------------------------------ the hint
def _hints(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if HINT in r.getMessage()]


def test_one_hint_line_when_the_images_are_smaller_than_the_crop(tmp_path, caplog):
    root = fake.make_folder(tmp_path / "small", n_train=3, n_val=1, size=(64, 64))
    data = _data(f"data.root={root}")  # the default crop, 480
    with caplog.at_level(logging.INFO, logger="setr"):
        SegDataModule(data, seed=0).setup("fit")
    assert _hints(caplog) == ["data.crop_size 480 is larger than your images (largest 64x64 in images/train): "
                              "set data.crop_size=64 (scales and the slide window follow it)"]
    assert [r.levelno for r in caplog.records if HINT in r.getMessage()] == [logging.WARNING]

    caplog.clear()  # debug=overfit validates on the training split: still one line
    with caplog.at_level(logging.INFO, logger="setr"):
        SegDataModule({**data, "root": str(fake.make_folder(tmp_path / "again", size=(64, 64))), "val_split": "train"},
                      seed=0).setup("fit")
    assert len(_hints(caplog)) == 1


def test_no_hint_when_the_crop_fits(tmp_path, caplog):
    root = fake.make_folder(tmp_path / "f", n_train=2, n_val=1, size=(64, 64))
    with caplog.at_level(logging.INFO, logger="setr"):
        SegDataModule(_data(f"data.root={root}", "data.crop_size=64"), seed=0).setup("fit")
        SegDataModule(_data(f"data.root={root}", "data.crop_size=48"), seed=0).setup("fit")
        # one side of the image at least as long as the crop: the recipe's own case (Pascal Context 375x500, crop 480)
        wide = fake.make_folder(tmp_path / "wide", n_train=2, n_val=1, size=(40, 96))
        SegDataModule(_data(f"data.root={wide}", "data.crop_size=80"), seed=0).setup("fit")
        # check=off reads no header: nothing to say
        SegDataModule(_data(f"data.root={root}", "data.check=off"), seed=0).setup("fit")
    assert _hints(caplog) == []
    assert any("data check quick" in r.getMessage() for r in caplog.records), "the check did run"
    with caplog.at_level(logging.INFO, logger="setr"):  # the same folder with a crop too large: the line
        SegDataModule(_data(f"data.root={root}", "data.crop_size=65"), seed=0).setup("fit")
    assert len(_hints(caplog)) == 1


def test_hint_for_a_height_width_crop_and_only_on_rank_zero(tmp_path, caplog, monkeypatch):
    root = fake.make_folder(tmp_path / "f", n_train=2, n_val=1)  # 40x56 (height x width)
    with caplog.at_level(logging.INFO, logger="setr"):
        build_dataset("folder", "train", root=str(root), crop_size=[80, 100], check="quick")
        build_dataset("folder", "val", root=str(root), crop_size=[80, 100], check="quick")  # not the train split
    assert _hints(caplog) == ["data.crop_size [80, 100] is larger than your images (largest 56x40 in images/train): "
                              "set data.crop_size=[32,48] (scales and the slide window follow it)"]

    from lightning.pytorch.utilities import rank_zero_only

    caplog.clear()
    monkeypatch.setattr(rank_zero_only, "rank", 1)
    with caplog.at_level(logging.INFO, logger="setr"):
        build_dataset("folder", "train", root=str(fake.make_folder(tmp_path / "g", n_train=1, n_val=1)),
                      crop_size=480, check="quick")
    assert _hints(caplog) == []


@pytest.mark.parametrize("crop", [0, "big", [1, 2, 3]])
def test_a_bad_crop_is_one_line(tmp_path, crop):
    from setr.errors import SETRConfigError

    root = fake.make_folder(tmp_path / "f", n_train=1, n_val=1)
    with pytest.raises(SETRConfigError, match=r"^data.crop_size: "):
        build_dataset("folder", "train", root=str(root), crop_size=crop, check="off")
