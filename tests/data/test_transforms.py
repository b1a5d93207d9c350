"""Augmentations keep image and mask aligned; recipe transforms follow mmsegmentation's semantics."""

from __future__ import annotations

import albumentations as A
import numpy as np
import pytest
import yaml

from pipeline import CONF
from setr.data.transforms import CatMaxRatioCrop, PhotoMetricDistortion, RandomRescale, build_pipeline, rescale_size

MEAN = (123.675, 116.28, 103.53)
STD = (58.395, 57.12, 57.375)


def shape_pair(h: int = 40, w: int = 56) -> tuple[np.ndarray, np.ndarray]:
    """A bright, off-centre L-shape (class 1) on a dark background (class 0), in image and mask alike: any
    flip, shift or scale applied to one but not the other moves it away from the other."""
    img = np.full((h, w, 3), 20, np.uint8)
    mask = np.zeros((h, w), np.uint8)
    for sl in ((slice(h // 5, h // 2), slice(w // 8, w // 3)), (slice(h // 2 - 4, h // 2), slice(w // 8, w // 2))):
        img[sl] = 235
        mask[sl] = 1
    return img, mask


def bright(img: np.ndarray) -> np.ndarray:
    gray = img.astype(np.float64).mean(-1)
    return gray > (gray.max() + gray.min()) / 2


def assert_aligned(img: np.ndarray, mask: np.ndarray, min_iou: float = 0.9) -> None:
    """The bright pixels of ``img`` are the class-1 pixels of ``mask`` (ignored / padded pixels excluded)."""
    valid = mask != 255
    shape, labelled = bright(img) & valid, (mask == 1) & valid
    assert labelled.any(), "the shape left the frame"
    iou = (shape & labelled).sum() / (shape | labelled).sum()
    assert iou >= min_iou, f"image and mask disagree (IoU {iou:.3f})"


def denormalize(t) -> np.ndarray:
    x = t.numpy().transpose(1, 2, 0) * np.asarray(STD) + np.asarray(MEAN)
    return np.clip(x, 0, 255).astype(np.uint8)


def test_alignment_check_detects_misalignment():
    """The helper the tests below rely on fails when only the image is flipped."""
    img, mask = shape_pair()
    assert_aligned(img, mask, min_iou=0.999)
    with pytest.raises(AssertionError, match="disagree"):
        assert_aligned(img[:, ::-1], mask)


def test_horizontal_flip_keeps_alignment():
    img, mask = shape_pair()
    out = A.Compose([A.HorizontalFlip(p=1.0)])(image=img, mask=mask)
    np.testing.assert_array_equal(out["mask"], mask[:, ::-1])
    assert_aligned(out["image"], out["mask"], min_iou=0.999)


@pytest.mark.parametrize("seed", range(4))
def test_random_rescale_sizes_and_alignment(seed):
    img, mask = shape_pair()
    t = A.Compose([RandomRescale(img_scale=(2048, 512), ratio_range=(0.5, 2.0))], seed=seed)
    out = t(image=img, mask=mask)
    h, w = out["mask"].shape
    assert out["image"].shape[:2] == (h, w)
    # keep-ratio: long side <= 2048 r, short side <= 512 r, one of them reached, for some r in [0.5, 2]
    assert abs(w / h - 56 / 40) < 0.02
    r = h / 512
    assert 0.5 - 0.01 <= r <= 2.0 + 0.01
    assert set(np.unique(out["mask"])) <= {0, 1}  # nearest: no blended labels
    assert_aligned(out["image"], out["mask"])


def test_rescale_to_the_test_scale():
    """ratio_range=None is the single-scale test resize (mmcv rescale_size with keep_ratio)."""
    assert rescale_size(40, 56, (2048, 512)) == (512, 717)      # ADE20K: short side 512
    assert rescale_size(1024, 2048, (2049, 1025)) == (1025, 2049)  # Cityscapes
    assert rescale_size(375, 500, (520, 520)) == (390, 520)     # Pascal Context: long side 520
    img, mask = shape_pair()
    out = A.Compose([RandomRescale(img_scale=(520, 520), ratio_range=None)])(image=img, mask=mask)
    assert out["mask"].shape == (371, 520)
    assert_aligned(out["image"], out["mask"])


@pytest.mark.parametrize("seed", range(4))
def test_cat_max_ratio_crop_alignment_and_no_padding(seed):
    img, mask = shape_pair(120, 160)
    out = A.Compose([CatMaxRatioCrop(64, 64, cat_max_ratio=0.75)], seed=seed)(image=img, mask=mask)
    assert out["image"].shape == (64, 64, 3) and out["mask"].shape == (64, 64)
    if (out["mask"] == 1).any():
        assert_aligned(out["image"], out["mask"])
    # smaller than the crop in one side: cropped in the other only, not padded (mmseg's RandomCrop; the
    # padding comes after Normalize, see below)
    small_img, small_mask = shape_pair(40, 156)
    out = A.Compose([CatMaxRatioCrop(64, 64, cat_max_ratio=0.75)], seed=seed)(image=small_img, mask=small_mask)
    assert out["image"].shape == (40, 64, 3) and out["mask"].shape == (40, 64)
    x0 = next(x for x in range(156 - 64 + 1) if np.array_equal(small_img[:, x : x + 64], out["image"]))
    np.testing.assert_array_equal(out["mask"], small_mask[:, x0 : x0 + 64])


def _padding_pipeline(distortion: dict | None = None, crop: int = 64) -> A.Compose:
    steps = [{"_target_": "setr.data.transforms.CatMaxRatioCrop", "height": crop, "width": crop,
              "cat_max_ratio": 0.75}]
    if distortion is not None:
        steps.append({"_target_": "setr.data.transforms.PhotoMetricDistortion", **distortion})
    return build_pipeline(steps, MEAN, STD, seed=0)


@pytest.mark.parametrize("seed", range(3))
def test_crop_is_padded_after_normalisation_as_mmseg(seed):
    """mmseg 0.x: RandomCrop, ..., PhotoMetricDistortion, Normalize, Pad(size=crop, pad_val=0, seg_pad_val=255):
    padded image pixels are exactly 0 after normalisation (the mean colour), padded labels 255, at the bottom
    and right; the real pixels are the normalised image, untouched by the padding."""
    img, mask = shape_pair(40, 56)
    pipe = _padding_pipeline()
    pipe.set_random_seed(seed)
    out = pipe(image=img, mask=mask)
    image, m = out["image"].numpy(), out["mask"].numpy()
    assert image.shape == (3, 64, 64) and m.shape == (64, 64)
    assert (image[:, 40:] == 0).all() and (image[:, :, 56:] == 0).all()
    assert (m[40:] == 255).all() and (m[:, 56:] == 255).all()
    np.testing.assert_array_equal(m[:40, :56], mask)
    expected = (img.astype(np.float32) - np.float32(MEAN)) / np.float32(STD)
    np.testing.assert_allclose(image[:, :40, :56].transpose(1, 2, 0), expected, atol=1e-4)


def test_photometric_distortion_sees_only_real_pixels():
    """With a brightness shift always drawn, the padded pixels still come out exactly 0 (never shifted), the
    real ones shifted; and the same seed gives the same distortion of the real pixels as without padding."""
    img, mask = shape_pair(40, 56)
    distortion = {"brightness_delta": 32, "contrast_range": [1.0, 1.0], "saturation_range": [1.0, 1.0],
                  "hue_delta": 0}
    pipe = _padding_pipeline(distortion)
    reference = _padding_pipeline(distortion, crop=40)  # 40x40 crop of a 40x56 image: no padding at all
    shifted = 0
    for seed in range(8):
        pipe.set_random_seed(seed)
        image = pipe(image=img, mask=mask)["image"].numpy()
        assert (image[:, 40:] == 0).all() and (image[:, :, 56:] == 0).all()
        real = image[:, :40, :56].transpose(1, 2, 0) * np.float32(STD) + np.float32(MEAN)
        shifted += not np.allclose(real, img, atol=1e-3)
    assert shifted, "no brightness shift was drawn in 8 seeds"
    assert reference(image=img, mask=mask)["image"].shape == (3, 40, 40)


def test_synthetic_default_pipeline_keeps_its_crop_size():
    cfg = yaml.safe_load((CONF / "data" / "synthetic.yaml").read_text())
    steps = [{k: (cfg["crop_size"] if v == "${data.crop_size}" else v) for k, v in st.items()}
             for st in cfg["train_pipeline"]]
    pipe = build_pipeline(steps, MEAN, STD, seed=0)
    img, mask = shape_pair(128, 128)
    sizes = set()
    for seed in range(12):  # rescale ratios 0.5..2: crops smaller (padded) and larger than 128 (cropped)
        pipe.set_random_seed(seed)
        out = pipe(image=img, mask=mask)
        assert tuple(out["image"].shape) == (3, 128, 128) and tuple(out["mask"].shape) == (128, 128)
        padded = out["mask"].numpy() == 255
        sizes.add(bool(padded.any()))
        assert (out["image"].numpy()[:, padded] == 0).all()
    assert sizes == {True, False}


def test_cat_max_ratio_prefers_mixed_crops():
    """A crop dominated (> 75 %) by one class is redrawn (up to 10 times) when a mixed one exists."""
    mask = np.zeros((100, 100), np.uint8)
    mask[:, 60:] = 1
    img = np.dstack([mask * 200] * 3).astype(np.uint8)
    mixed = 0
    for seed in range(20):
        out = A.Compose([CatMaxRatioCrop(40, 40, cat_max_ratio=0.75)], seed=seed)(image=img, mask=mask)
        counts = np.bincount(out["mask"].ravel(), minlength=2)
        mixed += counts.max() / counts.sum() < 0.75
        if (out["mask"] == 1).any():
            assert_aligned(out["image"], out["mask"])
    # a uniformly random 40x40 crop is mixed < 75 % in ~ 30 % of draws; with retries nearly always
    assert mixed >= 17


@pytest.mark.parametrize("name", ["ade20k", "cityscapes", "pascal_context", "folder", "synthetic"])
def test_config_train_pipelines_keep_alignment(name):
    from omegaconf import OmegaConf

    from conftest import _compose

    extra = ("data.num_classes=3",) if name == "folder" else ()
    cfg = OmegaConf.to_container(_compose((f"data={name}", *extra), "train").data, resolve=True)
    crop = cfg["crop_size"]
    steps = []
    for step in cfg["train_pipeline"]:
        if step["_target_"] == "albumentations.HorizontalFlip":
            step["p"] = 1.0  # always flip, so the flip is exercised in every draw
        steps.append(step)
    pipe = build_pipeline(steps, MEAN, STD, seed=0)
    img, mask = shape_pair()
    seen = 0
    for seed in range(3):
        pipe.set_random_seed(seed)
        out = pipe(image=img, mask=mask)
        assert tuple(out["image"].shape) == (3, crop, crop) and tuple(out["mask"].shape) == (crop, crop)
        m = out["mask"].numpy()
        assert set(np.unique(m)) <= {0, 1, 255}
        if (m == 1).any():
            seen += 1
            assert_aligned(denormalize(out["image"]), m)
    assert seen, "the shape never appeared in a crop"


def test_photometric_distortion_steps():
    img = np.array([[[200, 10, 10], [10, 100, 250]]], np.uint8)
    t = PhotoMetricDistortion()
    np.testing.assert_array_equal(t.apply(img, beta=60.0), np.clip(img.astype(int) + 60, 0, 255))
    np.testing.assert_array_equal(t.apply(img, alpha=2.0, contrast_first=True), np.clip(img.astype(int) * 2, 0, 255))
    gray = t.apply(img, saturation=0.0)
    assert (gray.max(-1) - gray.min(-1) <= 1).all()  # no saturation left
    red = np.array([[[255, 0, 0]]], np.uint8)
    np.testing.assert_array_equal(t.apply(red, hue=90), [[[0, 255, 255]]])  # half a turn: cyan
    np.testing.assert_array_equal(t.apply(img), img)  # no step drawn: unchanged


def test_photometric_distortion_is_image_only_and_seeded():
    img, mask = shape_pair()
    outs = []
    for _ in range(2):
        t = A.Compose([PhotoMetricDistortion()], seed=3)
        outs.append([t(image=img, mask=mask) for _ in range(4)])
    for a, b in zip(*outs):
        np.testing.assert_array_equal(a["image"], b["image"])
        assert a["mask"] is mask or np.array_equal(a["mask"], mask)
    assert any(not np.array_equal(o["image"], img) for o in outs[0])


def _mmseg_photometric_reference(img, beta=None, contrast_first=False, alpha=None, saturation=None, hue=None):
    """A straightforward float implementation of mmseg's PhotoMetricDistortion given its draws."""
    import cv2

    def convert(x, a=1.0, b=0.0):
        return np.clip(x.astype(np.float32) * a + b, 0, 255).astype(np.uint8)

    if beta is not None:
        img = convert(img, b=beta)
    if contrast_first and alpha is not None:
        img = convert(img, a=alpha)
    if saturation is not None or hue is not None:
        hsv = cv2.cvtColor(img, cv2.COLOR_RGB2HSV)
        if saturation is not None:
            hsv[..., 1] = convert(hsv[..., 1], a=saturation)
        if hue is not None:
            hsv[..., 0] = (hsv[..., 0].astype(np.int32) + hue) % 180
        img = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
    if not contrast_first and alpha is not None:
        img = convert(img, a=alpha)
    return img


def test_photometric_distortion_tables_equal_the_float_reference():
    """The LUT implementation gives exactly the pixels of mmseg's float computation, for every step mix."""
    import itertools

    img = np.random.default_rng(0).integers(0, 256, (32, 40, 3), dtype=np.uint8)
    t = PhotoMetricDistortion()
    for beta, first, alpha, sat, hue in itertools.product([None, -31.7, 12.3], [True, False], [None, 0.53, 1.41],
                                                           [None, 0.61, 1.37], [None, -18, 7, 18]):
        got = t.apply(img.copy(), beta=beta, contrast_first=first, alpha=alpha, saturation=sat, hue=hue)
        expected = _mmseg_photometric_reference(img, beta, first, alpha, sat, hue)
        np.testing.assert_array_equal(got, expected)
