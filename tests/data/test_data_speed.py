"""Issue 11: the per-worker throughput measurement, and the fast data path giving the reference results."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import albumentations as A
import cv2
import numpy as np
import pytest
from albumentations.pytorch import ToTensorV2
from PIL import Image

from setr.data.base import DataError, read_image, read_mask, reduce_zero_label
from setr.data.cityscapes import label_ids_to_train_ids
from setr.data.speed import main, pipeline_throughput
from setr.data.transforms import NormalizePadToTensor, RandomRescale, build_pipeline, class_counts

MEAN = [123.675, 116.28, 103.53]
STD = [58.395, 57.12, 57.375]
PIPELINE = [
    {"_target_": "setr.data.transforms.RandomRescale", "img_scale": [96, 48], "ratio_range": [0.5, 2.0]},
    {"_target_": "setr.data.transforms.CatMaxRatioCrop", "height": 32, "width": 32, "cat_max_ratio": 0.75},
    {"_target_": "albumentations.HorizontalFlip", "p": 0.5},
    {"_target_": "setr.data.transforms.PhotoMetricDistortion"},
]


@pytest.mark.parametrize("name", ["ade20k", "cityscapes", "synthetic"])
def test_pipeline_throughput_keys(name):
    cfg = {"name": name, "num_classes": 4, "crop_size": 32, "mean": MEAN, "std": STD, "train_pipeline": PIPELINE}
    r = pipeline_throughput(cfg, num_images=3, image_size=(40, 56), seed=1)
    assert {"images_per_s", "ms_per_image", "steps", "num_images", "image_size", "output_shape"} <= set(r)
    assert r["images_per_s"] > 0 and r["ms_per_image"] > 0 and r["output_shape"] == (3, 32, 32)
    assert list(r["steps"]) == ["decode", "RandomRescale", "CatMaxRatioCrop", "HorizontalFlip",
                                "PhotoMetricDistortion", "NormalizePadToTensor"]
    assert all(v >= 0 for v in r["steps"].values())


# ------------------------------------------------------------------- the command line: its final JSON line
_spec = importlib.util.spec_from_file_location(
    "benchmarks_record", Path(__file__).resolve().parents[2] / "benchmarks" / "record.py")
record = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(record)

DATASET_KEYS = {"dataset", "crop_size", "image_size_hw", "output_shape", "images_per_s", "ms_per_image", "steps_ms"}


def _cli(argv, capsys):
    """(exit status, stdout, stderr) of ``python -m setr.data.speed ARGV``."""
    try:
        rc = main(argv)
    except SystemExit as e:  # argparse's own mistakes
        rc = e.code
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_cli_ends_with_one_json_line_that_record_py_keeps(capsys):
    rc, out, err = _cli(["ade20k", "synthetic", "--num-images", "2", "--image-size", "80x60", "--crop", "32",
                         "--seed", "3"], capsys)
    assert rc == 0, err
    lines = out.strip().splitlines()
    result = json.loads(lines[-1])
    assert {"benchmark", "device", "workers", "threads_per_worker", "num_images", "seed", "crop", "image_size_hw",
            "overrides", "images_per_s_per_worker", "datasets"} <= set(result)
    assert (result["workers"], result["num_images"], result["seed"], result["crop"]) == (1, 2, 3, 32)
    assert result["device"] == "cpu" and result["image_size_hw"] == [60, 80]
    assert [d["dataset"] for d in result["datasets"]] == ["ade20k", "synthetic"]
    assert list(result["images_per_s_per_worker"]) == ["ade20k", "synthetic"]
    for d in result["datasets"]:
        assert set(d) >= DATASET_KEYS
        assert d["crop_size"] == 32 and d["image_size_hw"] == [60, 80] and d["output_shape"] == [3, 32, 32]
        assert d["images_per_s"] > 0 and next(iter(d["steps_ms"])) == "decode"
        assert result["images_per_s_per_worker"][d["dataset"]] == d["images_per_s"]
    # the human-readable lines stay above it
    assert lines[0].startswith("ade20k: ") and "images/s per worker" in lines[0]
    assert any(line.startswith("synthetic: ") for line in lines[:-1])
    assert record.last_json(out.splitlines(keepends=True)) == result


@pytest.mark.parametrize("argv, names", [
    (["synthetic", "--num-images", "0"], "--num-images"),
    (["synthetic", "--num-images", "x"], "--num-images"),
    (["synthetic", "--seed", "-1"], "--seed"),
    (["synthetic", "--crop", "0"], "--crop"),
    (["synthetic", "--image-size", "80"], "--image-size"),
    (["nope"], "conf/data/nope.yaml"),
    (["synthetic", "--override", "data.crop_size=abc"], "data.crop_size"),
    (["synthetic", "--override", "data.train_pipeline=3"], "data.train_pipeline"),
    (["folder"], "data.num_classes"),
])
def test_cli_bad_arguments_end_in_one_line(argv, names, capsys):
    rc, out, err = _cli(argv, capsys)
    assert rc == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and names in err and "Traceback" not in err


def _photo(rng, h=48, w=64):
    low = rng.integers(0, 256, (6, 8, 3)).astype(np.uint8)
    return np.clip(cv2.resize(low, (w, h), interpolation=cv2.INTER_CUBIC).astype(int)
                   + rng.integers(-9, 10, (h, w, 3)), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("ext", [".jpg", ".png"])
def test_opencv_decoding_gives_pil_pixels(tmp_path, ext):
    img = _photo(np.random.default_rng(0))
    path = tmp_path / f"a{ext}"
    Image.fromarray(img).save(path, **({"quality": 90} if ext == ".jpg" else {}))
    with Image.open(path) as im:
        np.testing.assert_array_equal(read_image(path), np.asarray(im.convert("RGB")))
    gray = tmp_path / "g.png"
    Image.fromarray(img[..., 0]).save(gray)
    m = read_mask(gray)
    assert m.dtype == np.int64 and read_mask(gray, dtype=None).dtype == np.uint8
    np.testing.assert_array_equal(m, img[..., 0])


def test_truncated_jpeg_still_raises(tmp_path):
    path = tmp_path / "a.jpg"
    Image.fromarray(_photo(np.random.default_rng(1), 96, 128)).save(path, quality=95)
    path.write_bytes(path.read_bytes()[:-400])
    with pytest.raises(DataError, match=r"a\.jpg"):
        read_image(path)


def test_uint8_label_maps_equal_the_int64_ones():
    raw = np.random.default_rng(0).integers(0, 34, (40, 50)).astype(np.uint8)
    raw[0, :3] = 255
    np.testing.assert_array_equal(label_ids_to_train_ids(raw, "x"), label_ids_to_train_ids(raw.astype(np.int64), "x"))
    assert label_ids_to_train_ids(raw, "x").dtype == np.uint8
    np.testing.assert_array_equal(reduce_zero_label(raw), reduce_zero_label(raw.astype(np.int64)))
    bad = raw.copy()
    bad[1, 1] = 40
    with pytest.raises(DataError, match=r"\[40\]"):
        label_ids_to_train_ids(bad, "x")


def test_class_counts_match_unique():
    rng = np.random.default_rng(0)
    mask = rng.choice(np.array([0, 3, 7, 255], np.uint8), (60, 70))
    view = mask[5:50, 3:61]
    for m in (view, view.astype(np.int64)):
        np.testing.assert_array_equal(class_counts(m, 255), np.unique(view[view != 255], return_counts=True)[1])


def test_rescale_sizes_and_nearest_labels():
    img = _photo(np.random.default_rng(2))
    mask = np.random.default_rng(3).choice(np.array([1, 5, 255], np.uint8), (48, 64))
    t = RandomRescale(img_scale=(128, 96), ratio_range=None)
    out = A.Compose([t])(image=img, mask=mask)
    assert out["image"].shape == (96, 128, 3) and out["mask"].shape == (96, 128)
    np.testing.assert_array_equal(out["image"], cv2.resize(img, (128, 96), interpolation=cv2.INTER_LINEAR))
    np.testing.assert_array_equal(out["mask"], mask[np.arange(96) // 2][:, np.arange(128) // 2])


@pytest.mark.parametrize("shape", [(20, 30), (32, 32), (40, 50)])
def test_fused_normalise_pad_equals_the_three_steps(shape):
    img = _photo(np.random.default_rng(4), *shape)
    mask = np.random.default_rng(5).integers(0, 4, shape).astype(np.uint8)
    ref = A.Compose([A.Normalize(mean=[m / 255 for m in MEAN], std=[s / 255 for s in STD], max_pixel_value=255.0),
                     A.PadIfNeeded(32, 32, position="top_left", border_mode=cv2.BORDER_CONSTANT, fill=0,
                                   fill_mask=255), ToTensorV2()])(image=img, mask=mask)
    out = A.Compose([NormalizePadToTensor(MEAN, STD, pad_to=(32, 32))])(image=img, mask=mask)
    assert out["image"].shape == ref["image"].shape and out["image"].is_contiguous()
    np.testing.assert_allclose(out["image"].numpy(), ref["image"].numpy(), atol=1e-5)
    np.testing.assert_array_equal(out["mask"].numpy(), ref["mask"].numpy())


def test_build_pipeline_ends_in_the_fused_step():
    pipe = build_pipeline(PIPELINE, MEAN, STD, seed=0)
    last = pipe.transforms[-1]
    assert isinstance(last, NormalizePadToTensor) and last.pad_to == (32, 32) and last.fill_mask == 255
