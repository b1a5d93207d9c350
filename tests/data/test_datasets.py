"""Real-dataset readers on tiny fake trees: layouts, label maps, palettes, converters, errors, configs."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

import fake_datasets as fake
from pipeline import CONF
from setr.data import DATASETS, SegDataset, build_dataset, build_pipeline, register_dataset
from setr.data import convert as conv
from setr.data.ade20k import ADE20K
from setr.data.cityscapes import Cityscapes
from setr.data.folder import FolderDataset
from setr.data.palettes import (
    ADE20K_CLASSES,
    ADE20K_PALETTE,
    CITYSCAPES_CLASSES,
    CITYSCAPES_ID_TO_TRAINID,
    CITYSCAPES_PALETTE,
    PASCAL_CONTEXT_59_CLASSES,
    PASCAL_CONTEXT_59_PALETTE,
    PASCAL_CONTEXT_CLASSES,
    PASCAL_CONTEXT_DETAIL_IDS,
    PASCAL_CONTEXT_PALETTE,
)
from setr.data.pascal_context import PascalContext, PascalContext59
from setr.errors import DataError, SETRConfigError


@pytest.fixture(scope="module")
def trees(tmp_path_factory) -> dict[str, Path]:
    """One fake tree of each layout, shared (read-only) by the tests of this module."""
    base = tmp_path_factory.mktemp("trees")
    return {
        "ade20k": fake.make_ade20k(base / "ade"),
        "cityscapes": fake.make_cityscapes(base / "cityscapes"),
        "pascal_context": fake.make_pascal_context(base / "pascal"),
        "folder": fake.make_folder(base / "folder"),
        "folder_lists": fake.make_folder(base / "folder_lists", layout="lists"),
    }


def _mask(ds, i: int) -> np.ndarray:
    return ds[i]["mask"].numpy()


def _one_line(excinfo) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg, msg
    return msg


# ------------------------------------------------------------------------------------------ palettes / classes
def test_class_names_and_palettes():
    assert len(ADE20K_CLASSES) == len(ADE20K_PALETTE) == 150
    assert ADE20K_CLASSES[:3] == ("wall", "building", "sky") and ADE20K_CLASSES[-1] == "flag"
    assert len(set(ADE20K_CLASSES)) == 150
    assert all(len(c) == 3 and all(0 <= v <= 255 for v in c) for c in ADE20K_PALETTE + CITYSCAPES_PALETTE)
    assert ADE20K_PALETTE[0] == (120, 120, 120) and ADE20K_PALETTE[-1] == (92, 0, 255)
    assert len(CITYSCAPES_CLASSES) == len(CITYSCAPES_PALETTE) == 19
    assert dict(zip(CITYSCAPES_CLASSES, CITYSCAPES_PALETTE))["road"] == (128, 64, 128)
    assert dict(zip(CITYSCAPES_CLASSES, CITYSCAPES_PALETTE))["bicycle"] == (119, 11, 32)
    assert sorted(CITYSCAPES_ID_TO_TRAINID.values()) == list(range(19))
    assert CITYSCAPES_ID_TO_TRAINID[7] == CITYSCAPES_CLASSES.index("road")
    assert CITYSCAPES_ID_TO_TRAINID[24] == CITYSCAPES_CLASSES.index("person")
    assert len(PASCAL_CONTEXT_CLASSES) == len(PASCAL_CONTEXT_PALETTE) == 60
    assert PASCAL_CONTEXT_CLASSES[0] == "background" and "background" not in PASCAL_CONTEXT_59_CLASSES
    assert len(PASCAL_CONTEXT_59_CLASSES) == len(PASCAL_CONTEXT_59_PALETTE) == 59
    assert tuple(PASCAL_CONTEXT_59_PALETTE) == tuple(PASCAL_CONTEXT_PALETTE[1:])
    # the 59 Detail ids, sorted, line up with the alphabetical class names (mmseg's np.digitize mapping)
    assert list(PASCAL_CONTEXT_59_CLASSES) == sorted(PASCAL_CONTEXT_59_CLASSES)
    assert dict(zip(PASCAL_CONTEXT_59_CLASSES, PASCAL_CONTEXT_DETAIL_IDS))["cat"] == 65
    assert dict(zip(PASCAL_CONTEXT_59_CLASSES, PASCAL_CONTEXT_DETAIL_IDS))["person"] == 284


def test_registry_offers_every_dataset(trees):
    for name, cls in (("ade20k", ADE20K), ("cityscapes", Cityscapes), ("pascal_context", PascalContext),
                      ("pascal_context_59", PascalContext59), ("folder", FolderDataset)):
        root = trees["folder" if name == "folder" else "pascal_context" if name.startswith("pascal") else name]
        ds = build_dataset(name, "val", root=str(root))
        assert type(ds) is cls
    with pytest.raises(SETRConfigError, match=r"data\.dataset"):
        build_dataset("ade20k", "train", root=str(trees["ade20k"]), no_such_option=1)


BUILTIN = ["ade20k", "cityscapes", "folder", "pascal_context", "pascal_context_59", "synthetic"]


def test_registry_is_complete_on_import():
    """One mechanism: every built-in class carries ``@register_dataset``, and importing the registry imports them
    (a fresh interpreter, so no other test has imported a dataset module first)."""
    code = "from setr.data.registry import DATASETS; print(' '.join(sorted(DATASETS)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == BUILTIN


def test_register_dataset_decorator_and_unknown_names():
    @register_dataset("test_only")
    class TestOnly(SegDataset):
        def __init__(self, split: str = "train", **kw) -> None:
            super().__init__(**kw)

    try:
        assert DATASETS["test_only"] is TestOnly
        assert type(build_dataset("test_only", "val")) is TestOnly
        register_dataset("test_only")(TestOnly)  # the same class again: harmless (a module imported twice)
        with pytest.raises(ValueError, match="'test_only' is already registered"):
            register_dataset("test_only")(type("Other", (SegDataset,), {}))
    finally:
        DATASETS.pop("test_only")
    with pytest.raises(SETRConfigError, match="data.name: unknown dataset 'nope'; choose one of " + ", ".join(BUILTIN)
                       ) as e:
        build_dataset("nope", "train")
    _one_line(e)


def test_layout_helpers_live_in_one_module():
    """Every file-based dataset finds and pairs its files with the helpers of setr.data.layout."""
    from setr.data import ade20k, cityscapes, folder, layout, pascal_context

    for module in (ade20k, cityscapes, folder, pascal_context):
        assert module.resolve_root is layout.resolve_root and module.files_by_key is layout.files_by_key, module
    assert ade20k.pair_files is cityscapes.pair_files is folder.pair_files is layout.pair_files
    assert folder.pair_listed is pascal_context.pair_listed is layout.pair_listed  # split lists
    assert folder.read_split_list is pascal_context.read_split_list is layout.read_split_list
    assert not hasattr(cityscapes.Cityscapes, "_pair")  # no pairing of its own


# ------------------------------------------------------------------------------------------ ADE20K
def test_ade20k_lengths_and_reduce_zero_label(trees):
    root = trees["ade20k"]
    train, val, test = (ADE20K(s, root=root) for s in ("train", "val", "test"))
    assert (len(train), len(val), len(test)) == (4, 2, 2)
    assert [p.name for p, _ in test.samples] == [p.name for p, _ in val.samples]  # no public test labels
    assert train.num_classes == 150 and train.palette == ADE20K_PALETTE
    for i in range(len(train)):
        m = _mask(train, i)
        np.testing.assert_array_equal(m, fake.expected_ade20k("training", i))
    m = _mask(train, 0)
    raw = fake.ade_raw("training", 0)
    assert (m[raw == 0] == 255).all() and (m[raw == 1] == 0).all() and (m[raw == 150] == 149).all()
    # the ADEChallengeData2016 folder itself is accepted as the root too
    assert len(ADE20K("val", root=root / "ADEChallengeData2016")) == 2
    sample = train[0]
    assert sample["image"].shape == (fake.H, fake.W, 3) and sample["image"].dtype == np.uint8


# ------------------------------------------------------------------------------------------ Cityscapes
def _cityscapes_index(path: Path) -> int:
    return int(path.name.split("_")[1])


def test_cityscapes_label_ids_and_converted_train_ids_agree(tmp_path):
    root = fake.make_cityscapes(tmp_path / "cs")
    on_the_fly = Cityscapes("train", root=root)
    assert len(on_the_fly) == 4 and {m.name.endswith("_labelIds.png") for _, m in on_the_fly.samples} == {True}
    assert on_the_fly.num_classes == 19 and on_the_fly.palette == CITYSCAPES_PALETTE
    with pytest.raises(DataError, match=r"setr\.data\.convert cityscapes"):
        Cityscapes("train", root=root, label_type="train_ids")

    assert conv.main(["cityscapes", str(root), "--workers", "2"]) == 0
    written = sorted(root.rglob("*_gtFine_labelTrainIds.png"))
    assert len(written) == 6  # 4 train + 2 val
    converted = Cityscapes("train", root=root)  # auto: the converted files are used now
    assert {m.name.endswith("_labelTrainIds.png") for _, m in converted.samples} == {True}
    forced = Cityscapes("train", root=root, label_type="label_ids")
    for i in range(len(converted)):
        expected = fake.expected_cityscapes("train", _cityscapes_index(converted.samples[i][0]))
        np.testing.assert_array_equal(_mask(converted, i), expected)
        np.testing.assert_array_equal(_mask(forced, i), expected)
        np.testing.assert_array_equal(_mask(on_the_fly, i), expected)
    # a second run keeps the existing files unless --overwrite
    assert conv.convert_cityscapes(root) == (0, 6)
    assert conv.convert_cityscapes(root, overwrite=True) == (6, 0)


def test_cityscapes_splits_and_mapping(trees):
    root = trees["cityscapes"]
    val, test = Cityscapes("val", root=root), Cityscapes("test", root=root)
    assert len(val) == len(test) == 2 and test.samples == val.samples
    m = _mask(val, 0)
    raw = fake.cityscapes_raw("val", _cityscapes_index(val.samples[0][0]))
    assert (m[raw == 7] == 0).all() and (m[raw == 26] == 13).all() and (m[raw == 33] == 18).all()
    assert (m[(raw == 0) | (raw == 4) | (raw == 255)] == 255).all()
    with pytest.raises(SETRConfigError, match="label_type"):
        Cityscapes("val", root=root, label_type="colour")


# ------------------------------------------------------------------------------------------ Pascal Context
def test_pascal_context_60_and_59(trees):
    root = trees["pascal_context"]
    ds60, ds59 = PascalContext("train", root=root), PascalContext59("train", root=root)
    assert len(ds60) == len(ds59) == 5 and len(PascalContext("val", root=root)) == 2
    assert ds60.num_classes == 60 and ds59.num_classes == 59
    assert ds60.class_names[0] == "background" and ds59.class_names[0] == "aeroplane"
    for i, (img, _) in enumerate(ds60.samples):
        m60, m59 = _mask(ds60, i), _mask(ds59, i)
        if img.stem == fake.POLYGON_STEM:
            expected = fake.expected_pascal_polygon()
        else:
            split = "train" if img.stem.startswith("2008") else "val"
            expected = fake.expected_pascal_context(split, int(img.stem.split("_")[1]) - 1)
        np.testing.assert_array_equal(m60, expected)
        np.testing.assert_array_equal(m59, np.where(expected == 0, 255, expected - 1))
    # VOC2010 itself, or the folder holding VOCdevkit, are both accepted as root
    assert len(PascalContext("val", root=root / "VOCdevkit" / "VOC2010")) == 2


def test_pascal_context_converter_outputs(trees):
    voc = trees["pascal_context"] / "VOCdevkit" / "VOC2010"
    lists = voc / "ImageSets" / "SegmentationContext"
    train = (lists / "train.txt").read_text().split()
    val = (lists / "val.txt").read_text().split()
    assert train == sorted([*fake.pascal_names("train", 4), fake.POLYGON_STEM])
    assert val == fake.pascal_names("val", 2)  # the "test"-phase image is left out
    assert not (voc / "SegmentationClassContext" / "2010_000002.png").exists()
    # every encoding: compressed RLE (train), uncompressed counts (last val image), polygon
    last_val = np.asarray(Image.open(voc / "SegmentationClassContext" / f"{val[-1]}.png"))
    np.testing.assert_array_equal(last_val, fake.expected_pascal_context("val", 1))
    poly = np.asarray(Image.open(voc / "SegmentationClassContext" / f"{fake.POLYGON_STEM}.png"))
    np.testing.assert_array_equal(poly, fake.expected_pascal_polygon())


def test_coco_rle_string_by_hand():
    # counts [1, 40, 2, 3]: '1'; 40 = 8 + 1<<5 -> 'X' '1'; '2'; 3 - 40 = -37 -> 'k' 'N' (delta to counts[1])
    assert conv.counts_to_rle_string([1, 40, 2, 3]) == "1X12kN"
    assert conv.rle_string_to_counts("1X12kN") == [1, 40, 2, 3]
    mask = conv.rle_counts_to_mask([1, 40, 2, 3], 2, 23)
    assert mask.shape == (2, 23) and mask.sum() == 43
    assert not mask[0, 0] and mask[1, 0] and not mask[1, 20] and not mask[0, 21] and mask[1, 21]  # column-major
    assert conv.mask_to_rle_counts(mask) == [1, 40, 2, 3]
    with pytest.raises(ValueError, match="pixels"):
        conv.rle_counts_to_mask([1, 2], 2, 2)


def test_pascal_context_converter_errors(tmp_path, capsys):
    root = fake.make_pascal_context(tmp_path / "pc", n_train=1, n_val=1, convert=False)
    doc = json.loads((root / "trainval_merged.json").read_text())
    assert doc["annos_segmentation"][0]["category_id"] == 2  # aeroplane = class 1 of 2008_000001
    doc["annos_segmentation"][0]["category_id"] = 7  # not one of the 59 classes
    (root / "other.json").write_text(json.dumps(doc))
    with pytest.raises(DataError, match=re.escape("2008_000001.jpg") + r".*\[7\]") as e:
        conv.convert_pascal_context(root, root / "other.json")
    _one_line(e)
    conv.convert_pascal_context(root, root / "other.json", other="background")
    out = np.asarray(Image.open(root / "VOCdevkit/VOC2010/SegmentationClassContext/2008_000001.png"))
    lab = fake.expected_pascal_context("train", 0)
    assert (lab == 1).any()
    np.testing.assert_array_equal(out, np.where(lab == 1, 0, lab))

    with pytest.raises(DataError, match=re.escape("missing.json")):
        conv.convert_pascal_context(root, root / "missing.json")
    (root / "coco.json").write_text(json.dumps({"images": [], "annotations": []}))
    with pytest.raises(DataError, match=r"coco\.json.*annos_segmentation"):
        conv.convert_pascal_context(root, root / "coco.json")
    doc["categories"].append({"category_id": 65, "name": "dog"})  # a renamed id is reported
    doc["categories"] = [c for c in doc["categories"] if c["name"] != "cat"]
    (root / "renamed.json").write_text(json.dumps(doc))
    assert conv.main(["pascal_context", str(root), "--json", "renamed.json", "--other", "background"]) == 0
    assert "id 65: 'dog' (expected 'cat')" in capsys.readouterr().err
    # CLI: one line on stderr, exit code 2
    assert conv.main(["pascal_context", str(tmp_path / "nowhere"), "--json", "x.json"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "nowhere" in err and "\n" not in err


# ------------------------------------------------------------------------------------------ folder
def test_folder_both_layouts_and_classes(trees):
    for key in ("folder", "folder_lists"):
        train = FolderDataset("train", root=trees[key])
        assert len(train) == 4 and len(FolderDataset("val", root=trees[key])) == 2
        assert train.class_names == list(fake.FOLDER_CLASSES)
        assert train.palette[:2] == [(0, 0, 0), (128, 64, 128)] and len(train.palette) == 3
        for i in range(len(train)):
            np.testing.assert_array_equal(_mask(train, i), fake.folder_raw("train", i))
    test = FolderDataset("test", root=trees["folder"])  # no test split: val
    assert [p for p, _ in test.samples] == [p for p, _ in FolderDataset("val", root=trees["folder"]).samples]
    with pytest.raises(SETRConfigError, match=r"data.num_classes=3"):
        FolderDataset("train", root=trees["folder"], num_classes=4)


def test_folder_reduce_zero_label_and_classes_file(tmp_path):
    root = fake.make_folder(tmp_path / "f", n_train=1, n_val=1)
    (tmp_path / "my_classes.yaml").write_text("classes: [road, car]\n")
    ds = FolderDataset("train", root=root, classes_file=tmp_path / "my_classes.yaml", reduce_zero_label=True)
    raw = fake.folder_raw("train", 0)
    np.testing.assert_array_equal(_mask(ds, 0), np.where(raw == 0, 255, np.where(raw == 255, 255, raw - 1)))
    assert ds.class_names == ["road", "car"] and len(ds.palette) == 2
    (tmp_path / "bad.yaml").write_text("classes:\n  - {name: road, color: [300, 0, 0]}\n")
    with pytest.raises(DataError, match=r"bad\.yaml.*road"):
        FolderDataset("train", root=root, classes_file=tmp_path / "bad.yaml")
    Image.open(root / "masks/val/val_000.png").save(root / "masks/val/val_000.jpg")
    (root / "masks/val/val_000.png").unlink()
    with pytest.raises(DataError, match=r"val_000\.jpg: JPEG label images are lossy"):
        FolderDataset("val", root=root)
    (root / "classes.yaml").unlink()
    with pytest.raises(DataError, match=re.escape(str(root / "classes.yaml"))):
        FolderDataset("train", root=root)


# ------------------------------------------------------------------------------------------ errors
@pytest.mark.parametrize("name", ["ade20k", "cityscapes", "pascal_context", "pascal_context_59", "folder"])
def test_missing_root_names_path_layout_and_readme(tmp_path, name):
    missing = tmp_path / "not_downloaded"
    with pytest.raises(DataError, match=re.escape(str(missing)) + ".*expect.*data/README.md") as e:
        build_dataset(name, "train", root=str(missing))
    _one_line(e)
    missing.mkdir()  # exists, but holds no dataset
    with pytest.raises(DataError, match=re.escape(str(missing)) + ".*data/README.md"):
        build_dataset(name, "train", root=str(missing))


def test_unmatched_files_and_count_mismatch(tmp_path):
    root = fake.make_ade20k(tmp_path / "ade", n_train=3, n_val=1)
    (root / "ADEChallengeData2016/annotations/training/ADE_train_00000002.png").unlink()
    with pytest.raises(DataError, match=r"3 images .* but 2 label files; no label file for ADE_train_00000002\.jpg"
                       ) as e:
        ADE20K("train", root=root)
    _one_line(e)

    cs = fake.make_cityscapes(tmp_path / "cs", n_train=2, n_val=1)
    (cs / "leftImg8bit/val/frankfurt/frankfurt_000000_000019_leftImg8bit.png").unlink()
    with pytest.raises(DataError, match=r"no image for label frankfurt/frankfurt_000000_000019_gtFine_labelIds\.png"):
        Cityscapes("val", root=cs)

    folder = fake.make_folder(tmp_path / "folder", n_train=2, n_val=1)
    (folder / "masks/train/train_001.png").rename(folder / "masks/train/train_001_typo.png")
    with pytest.raises(DataError, match=r"no label file for train_001\.png"):
        FolderDataset("train", root=folder)

    pc = fake.make_pascal_context(tmp_path / "pc", n_train=2, n_val=1)
    (pc / "VOCdevkit/VOC2010/JPEGImages/2009_000001.jpg").unlink()
    with pytest.raises(DataError, match=r"val\.txt: lists '2009_000001' but .*JPEGImages has no such image") as e:
        PascalContext("val", root=pc)
    _one_line(e)
    (pc / "VOCdevkit/VOC2010/SegmentationClassContext/2008_000002.png").unlink()
    with pytest.raises(DataError, match=r"no label file for 2008_000002\.jpg"):
        PascalContext("train", root=pc)
    skipping = PascalContext("train", root=pc, skip_bad=True)
    assert len(skipping) == 2 and len(skipping.skipped) == 1  # 2 listed + the polygon image, one without label
    (pc / "VOCdevkit/VOC2010/ImageSets/SegmentationContext/train.txt").unlink()
    with pytest.raises(DataError, match=r"train\.txt: split list not found.*setr\.data\.convert pascal_context"):
        PascalContext("train", root=pc)


def test_size_mismatch_names_the_label(tmp_path):
    cs = fake.make_cityscapes(tmp_path / "cs", n_train=1, n_val=1)
    label = cs / "gtFine/val/frankfurt/frankfurt_000000_000019_gtFine_labelIds.png"
    Image.fromarray(np.full((fake.H, fake.W + 8), 7, np.uint8)).save(label)
    ds = Cityscapes("val", root=cs)
    with pytest.raises(DataError, match=re.escape(label.name) + r".*size 64x40 differs from image") as e:
        ds[0]
    _one_line(e)


@pytest.mark.parametrize("name,value", [("ade20k", 151), ("cityscapes", 34), ("pascal_context", 60),
                                        ("pascal_context_59", 77), ("folder", 3)])
def test_label_values_outside_the_classes(tmp_path, name, value):
    maker = {"ade20k": fake.make_ade20k, "cityscapes": fake.make_cityscapes, "folder": fake.make_folder}.get(
        name, fake.make_pascal_context)
    root = maker(tmp_path / name, n_train=1, n_val=1)
    ds = build_dataset(name, "val", root=str(root))
    label = Path(ds.samples[0][1])
    raw = np.asarray(Image.open(label)).copy()
    raw[5:9, 5:9] = value
    Image.fromarray(raw).save(label)
    with pytest.raises(DataError, match=re.escape(label.name) + r".*\[" + str(value if name != "folder" else 3)) as e:
        ds[0]
    _one_line(e)


def test_truncated_and_unreadable_images(tmp_path):
    root = fake.make_ade20k(tmp_path / "ade", n_train=2, n_val=1)
    img = root / "ADEChallengeData2016/images/validation/ADE_val_00000001.jpg"
    data = img.read_bytes()
    img.write_bytes(data[: len(data) // 2])
    ds = ADE20K("val", root=root)
    with pytest.raises(DataError, match=re.escape(img.name) + ".*truncated") as e:
        ds[0]
    _one_line(e)

    folder = fake.make_folder(tmp_path / "folder", n_train=1, n_val=1)
    (folder / "images/val/val_000.png").write_bytes(b"this is not a png")
    with pytest.raises(DataError, match=r"val_000\.png: unreadable"):
        FolderDataset("val", root=folder)[0]
    (folder / "masks/train/train_000.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    with pytest.raises(DataError, match=r"train_000\.png: unreadable or truncated label"):
        FolderDataset("train", root=folder)[0]


@pytest.mark.parametrize("check, skipped", [("quick", 3), ("full", 4)])
def test_skip_bad_skips_and_counts(tmp_path, check, skipped):
    """``skip_bad`` leaves out what the listing and the pre-flight check (``data.check``) reject: a missing
    label, an unreadable file and a size mismatch at ``quick``; label values too at ``full``."""
    root = fake.make_ade20k(tmp_path / "ade", n_train=5, n_val=1)
    base = root / "ADEChallengeData2016"
    (base / "images/training/ADE_train_00000001.jpg").write_bytes(b"garbage")          # unreadable
    (base / "annotations/training/ADE_train_00000002.png").unlink()                    # no label
    Image.fromarray(np.full((fake.H, fake.W), 200, np.uint8)).save(
        base / "annotations/training/ADE_train_00000003.png")                          # bad values
    Image.fromarray(np.ones((8, 8), np.uint8)).save(base / "annotations/training/ADE_train_00000004.png")  # size
    ds = build_dataset("ade20k", "train", root=str(root), skip_bad=True, check=check)
    assert len(ds) == 5 - skipped and ds.samples[-1][0].name == "ADE_train_00000005.jpg"
    assert len(ds.skipped) == skipped
    for n in (1, 2, 4, 3)[:skipped]:
        assert any(f"ADE_train_0000000{n}" in s for s in ds.skipped), ds.skipped
    np.testing.assert_array_equal(_mask(ds, len(ds) - 1), fake.expected_ade20k("training", 4))
    with pytest.raises(DataError):
        build_dataset("ade20k", "train", root=str(root), skip_bad=False, check=check)


# ------------------------------------------------------------------------------------------ configs
DATA_CONFIGS = {  # config -> (fake tree, crop, slide crop / stride, per-device batch)
    "ade20k": ("ade20k", 512, 341, 2),
    "cityscapes": ("cityscapes", 768, 512, 1),
    "pascal_context": ("pascal_context", 480, 320, 2),
    "pascal_context_59": ("pascal_context", 480, 320, 2),
    "folder": ("folder", 480, 320, 2),
}


def _compose(overrides: list[str]):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(version_base="1.3", config_dir=str(CONF)):
        return compose("train", overrides=overrides)


@pytest.mark.parametrize("name", list(DATA_CONFIGS))
def test_data_config_builds_datasets_and_pipelines(trees, name):
    from omegaconf import OmegaConf

    tree, crop, stride, batch = DATA_CONFIGS[name]
    overrides = [f"data={name}", f"data.root={trees[tree]}"] + (["data.num_classes=3"] if name == "folder" else [])
    data = OmegaConf.to_container(_compose(overrides).data, resolve=True)
    assert data["name"] == name and data["crop_size"] == crop and data["batch_size"] == batch
    assert data["val_batch_size"] == 1 and data["val_keep_original_mask"] is True
    assert data["inference"] == {"mode": "slide", "crop_size": crop, "stride": stride, "batch_size": None,
                                 "scales": [1.0], "flip": False}
    for split in ("train", "val"):
        kwargs = dict(data["dataset"])
        if split != "train":
            kwargs.update(data["val_dataset"])
        steps = data["train_pipeline" if split == "train" else "val_pipeline"]
        ds = build_dataset(name, split, root=data["root"], skip_bad=data["skip_bad"],
                           keep_original_mask=split != "train" and data["val_keep_original_mask"],
                           transform=build_pipeline(steps, data["mean"], data["std"], seed=0), **kwargs)
        assert ds.num_classes == data["num_classes"] and len(ds.palette) == ds.num_classes
        valid = set(range(ds.num_classes)) | {255}
        for i in range(2):
            s = ds[(i, 7 + i)]
            assert isinstance(s["image"], torch.Tensor) and s["image"].dtype == torch.float32
            assert set(np.unique(s["mask"].numpy()).tolist()) <= valid
            if split == "train":
                assert s["image"].shape == (3, crop, crop) and s["mask"].shape == (crop, crop)
            else:  # resized image, label at its original size
                assert s["mask"].shape == (fake.H, fake.W)
                assert s["image"].shape[0] == 3 and s["image"].shape[1] > fake.H


def test_data_module_runs_on_a_fake_tree(trees):
    """The lead's data module, fed by a real data config: one train batch, one validation batch."""
    from omegaconf import OmegaConf

    from setr.training.datamodule import SegDataModule

    cfg = _compose(["data=pascal_context_59", f"data.root={trees['pascal_context']}", "data.num_workers=0",
                    "data.persistent_workers=false", "data.pin_memory=false"])
    dm = SegDataModule(OmegaConf.to_container(cfg.data, resolve=True), seed=0)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (2, 3, 480, 480) and batch["mask"].shape == (2, 480, 480)
    val = next(iter(dm.val_dataloader()))
    assert val["mask"].shape[-2:] == (fake.H, fake.W)
    assert dm.class_names == list(PASCAL_CONTEXT_59_CLASSES)


EXPERIMENTS = {  # name -> (data, head, encoder, lr, max_steps, batch per device, published SS mIoU)
    **{f"cityscapes_{h}{e}_{k}k": ("cityscapes", h, enc, 0.002 if h == "mla" else 0.01, k * 1000, 1, miou)
       for (h, e, enc), (m40, m80) in {
           ("naive", "", "vit_large"): (77.37, 77.90), ("mla", "", "vit_large"): (76.65, 77.24),
           ("pup", "", "vit_large"): (78.39, 79.34), ("naive", "_base", "vit_base"): (75.54, 76.25),
           ("naive", "_deit", "deit_base"): (77.85, 78.66), ("mla", "_deit", "deit_base"): (78.04, 78.98),
           ("pup", "_deit", "deit_base"): (78.79, 79.45)}.items()
       for k, miou in ((40, m40), (80, m80))},
    **{f"{d}_{h}{e}_b{b}": (d, h, enc, 0.01 if h == "naive" else 0.001, steps, b // 8, miou)
       for d, steps, rows in (
           ("ade20k", 160000, (("naive", "", 16, 48.06), ("mla", "", 8, 47.79), ("mla", "", 16, 48.64),
                               ("mla", "_deit", 16, 46.15), ("pup", "", 16, 48.62), ("pup", "_deit", 16, 46.34))),
           ("pascal_context", 80000, (("naive", "", 16, 52.89), ("mla", "", 8, 54.39), ("mla", "", 16, 55.01),
                                      ("mla", "_deit", 16, 52.91), ("pup", "", 16, 54.37),
                                      ("pup", "_deit", 16, 52.00))))
       for h, e, b, miou in rows
       for enc in ["deit_base" if e else "vit_large"]},
}


MMSEG_EXPERIMENTS = {  # mmsegmentation's structure and published numbers (its SETR README): name -> (head, SS, MS)
    "ade20k_naive_mmseg_b16": ("naive_mmseg", 48.28, 49.56), "ade20k_pup_mmseg_b16": ("pup_mmseg", 48.24, 49.99),
    "ade20k_mla_mmseg_b8": ("mla_mmseg", 47.34, 49.05), "ade20k_mla_mmseg_b16": ("mla_mmseg", 47.54, 49.37),
    "cityscapes_naive_mmseg_80k": ("naive_mmseg_cityscapes", 78.10, 80.22),
    "cityscapes_pup_mmseg_80k": ("pup_mmseg", 79.21, 81.02), "cityscapes_mla_mmseg_80k": ("mla_mmseg", 77.00, 79.59),
}
OFFICIAL_MS = {"ade20k_naive_b16": 48.80, "ade20k_mla_b8": 50.03, "ade20k_mla_b16": 50.28,
               "ade20k_mla_deit_b16": 47.71, "ade20k_pup_b16": 50.09, "ade20k_pup_deit_b16": 47.30,
               "pascal_context_naive_b16": 53.61, "pascal_context_mla_b8": 55.39, "pascal_context_mla_b16": 55.83,
               "pascal_context_mla_deit_b16": 53.74, "pascal_context_pup_b16": 55.27,
               "pascal_context_pup_deit_b16": 52.50}


def test_experiment_presets_cover_the_official_table():
    """The presets with a published number are the official tables' rows (the presets on today's encoders have
    none: tests/test_encoder_presets.py)."""
    files = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml")
                   if "published" in yaml.safe_load(p.read_text()))
    assert sorted([*EXPERIMENTS, *MMSEG_EXPERIMENTS]) == files and len(files) == 26 + 7
    for name, (data, head, enc, lr, steps, batch, miou) in EXPERIMENTS.items():
        text = (CONF / "experiment" / f"{name}.yaml").read_text()
        assert text.startswith("# @package _global_"), name
        assert f"{miou:.2f} mIoU" in text, name
        assert yaml.safe_load(text)["published"] == {"ss": miou, "ms": OFFICIAL_MS.get(name),
                                                      "source": "official SETR README"}, name
        doc = yaml.safe_load(text)
        defaults = {k: v for entry in doc["defaults"] for k, v in entry.items()}
        assert defaults.pop("override /data") == data and defaults.pop("override /model") == f"setr_{head}", name
        assert defaults.pop("override /trainer") == "ddp", name
        assert defaults.pop("override /model/encoder", "vit_large") == enc and not defaults, name
        assert doc["optimizer"]["lr"] == lr and doc["trainer"]["max_steps"] == steps, name
        assert doc["trainer"]["devices"] == 8 and doc["data"]["batch_size"] == batch, name


@pytest.mark.parametrize("name", sorted(MMSEG_EXPERIMENTS))
def test_mmseg_presets_build_mmsegs_model_and_carry_its_numbers(name):
    from omegaconf import OmegaConf

    from setr.models.summary import build_meta_model, count_params

    head, ss, ms = MMSEG_EXPERIMENTS[name]
    cfg = _compose([f"experiment={name}"])
    model = OmegaConf.to_container(cfg.model, resolve=True)
    assert model["head"]["name"] == head and model["encoder"]["patch_bias"] is False
    assert OmegaConf.to_container(cfg.published) == {"ss": ss, "ms": ms, "source": "mmsegmentation SETR README"}
    assert cfg.data.ms_min_short is None, "mmseg's TTA has no short-side floor"
    if name.startswith("ade20k") and head != "naive_mmseg_cityscapes":
        want = {"naive_mmseg": 305_557_592, "pup_mmseg": 317_290_072, "mla_mmseg": 309_569_262}[head]
        assert count_params(build_meta_model(model))[0] == want


@pytest.mark.parametrize("name", ["cityscapes_pup_80k", "ade20k_mla_b16", "pascal_context_mla_b8",
                                  "cityscapes_naive_deit_40k", "cityscapes_naive_base_80k"])
def test_experiment_presets_compose(name):
    from omegaconf import OmegaConf

    data, head, enc, lr, steps, batch, _ = EXPERIMENTS[name]
    cfg = _compose([f"experiment={name}"])
    model = OmegaConf.to_container(cfg.model, resolve=True)
    assert cfg.data.name == data and model["head"]["name"] == head and cfg.optimizer.lr == lr
    assert model["encoder"]["name"].startswith({"vit_large": "vit_large", "vit_base": "vit_base",
                                                "deit_base": "deit_base"}[enc])
    assert model["encoder"]["img_size"] == cfg.data.crop_size
    assert cfg.trainer.devices == 8 and cfg.trainer.max_steps == steps and cfg.data.batch_size == batch
    assert "DDPStrategy" in cfg.trainer.strategy._target_
    assert cfg.trainer.val_check_interval == steps // 10


def test_fake_tree_builders_are_reusable(tmp_path):
    """The builders return the data.root to use and can be called twice on one folder."""
    for maker in (fake.make_ade20k, fake.make_cityscapes, fake.make_pascal_context, fake.make_folder):
        root = maker(tmp_path / maker.__name__)
        assert root == tmp_path / maker.__name__ and root.is_dir()
        assert maker(root) == root


# ------------------------------------------------------------------------------------ through src/train.py
@pytest.mark.slow
@pytest.mark.parametrize("name, classes", [("ade20k", 150), ("cityscapes", 19), ("pascal_context", 60),
                                           ("pascal_context_59", 59), ("folder", 3)])
def test_train_entry_point_on_each_fake_tree(tmp_path, name, classes):
    """Two training steps and a sliding-window validation through src/train.py, with the dataset's own config
    (pipelines scaled down to the fake 40x56 images), the data found under paths.data_dir as users lay it out."""
    from pipeline import last_json, run_entry

    data_dir = tmp_path / "data"
    maker = {"ade20k": fake.make_ade20k, "cityscapes": fake.make_cityscapes, "folder": fake.make_folder,
             "pascal_context": fake.make_pascal_context, "pascal_context_59": fake.make_pascal_context}[name]
    maker(data_dir / ("pascal_context" if name.startswith("pascal") else name))
    args = [f"data={name}", f"paths.data_dir={data_dir}", "model/encoder=vit_test", "data.crop_size=64",
            "data.train_pipeline.0.img_scale=[112,80]", "data.val_pipeline.0.img_scale=[112,80]",
            "data.inference.stride=32", "data.batch_size=2", "data.num_workers=0", "data.persistent_workers=false",
            "trainer.max_steps=2", "trainer.val_check_interval=2", "extras.print_config=false",
            f"hydra.run.dir={tmp_path / 'run'}"]
    if name == "folder":
        args.append("data.num_classes=3")
    metrics = last_json(run_entry("train.py", *args, log_dir=tmp_path / "logs"))
    assert metrics["global_step"] == 2 and 0.0 <= metrics["val/mIoU"] <= 1.0
    report = json.loads((tmp_path / "run" / "val_scores.json").read_text())
    assert len(report["per_class"]) == classes
