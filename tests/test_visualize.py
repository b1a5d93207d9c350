"""setr.visualize: what predict.py, the W&B callback and the notebooks draw label maps with."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from setr.data.transforms import build_pipeline
from setr.errors import SETRConfigError
from setr.inference import normalize
from setr.visualize import colorize, denormalize, overlay, side_by_side_image

MEAN, STD = [123.675, 116.28, 103.53], [58.395, 57.12, 57.375]
PALETTE = [[255, 0, 0], [0, 255, 0], [0, 0, 255]]


def _image(h: int = 17, w: int = 23) -> np.ndarray:
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    image[0, :3] = [[0, 0, 0], [255, 255, 255], [0, 255, 128]]  # the ends of the range survive too
    return image


def test_denormalize_undoes_the_data_pipelines_and_predicts_normalisation():
    image = _image()
    by_data = build_pipeline([], MEAN, STD)(image=image)["image"]  # Normalize + ToTensorV2, as training reads
    by_predict = normalize(image, MEAN, STD)[0]  # what predict.py and the notebooks feed the network
    assert by_data.shape == by_predict.shape == (3, 17, 23) and by_data.dtype == torch.float32
    torch.testing.assert_close(by_data, by_predict, atol=1e-5, rtol=0)
    for x in (by_data, by_predict, by_predict.numpy()):
        back = denormalize(x, MEAN, STD)
        assert back.dtype == np.uint8 and back.shape == image.shape
        np.testing.assert_array_equal(back, image)
    assert denormalize(torch.full((3, 2, 2), 100.0), MEAN, STD).max() == 255  # clipped, not wrapped
    with pytest.raises(ValueError, match=r"\(3, H, W\)"):
        denormalize(torch.zeros(1, 3, 4, 4), MEAN, STD)


def test_colorize_keeps_the_ids_and_the_palette():
    label = np.array([[0, 1, 2], [2, 1, 255]], np.int64)
    im = colorize(torch.from_numpy(label), PALETTE)
    assert im.mode == "P" and im.size == (3, 2)
    np.testing.assert_array_equal(np.asarray(im), label.astype(np.uint8))  # the pixel values are the class ids
    assert im.getpalette()[:9] == [v for c in PALETTE for v in c]
    rgb = np.asarray(im.convert("RGB"))
    assert rgb[0, 0].tolist() == [255, 0, 0] and rgb[0, 2].tolist() == [0, 0, 255]
    assert rgb[1, 2].tolist() == [0, 0, 0], "ids past the palette are black"
    white = np.asarray(colorize(label, PALETTE, other=(255, 255, 255)).convert("RGB"))
    assert white[1, 2].tolist() == [255, 255, 255] and white[0, 0].tolist() == [255, 0, 0]
    with pytest.raises(ValueError, match=r"0\.\.255"):
        colorize(np.array([[256]]), PALETTE)
    with pytest.raises(ValueError, match=r"\(H, W\)"):
        colorize(np.zeros((1, 2, 2)), PALETTE)


def test_overlay_alpha_0_is_the_image_and_1_the_colours():
    image = np.full((2, 2, 3), 100, np.uint8)
    label = np.array([[0, 1], [2, 255]])
    np.testing.assert_array_equal(np.asarray(overlay(image, label, PALETTE, alpha=0.0)), image)
    full = np.asarray(overlay(image, label, PALETTE, alpha=1.0))
    assert full[0, 0].tolist() == [255, 0, 0] and full[0, 1].tolist() == [0, 255, 0]
    assert full[1, 0].tolist() == [0, 0, 255]
    assert full[1, 1].tolist() == [100, 100, 100], "an id without a palette entry (255) keeps the image"
    blend = np.asarray(overlay(image, label, PALETTE, alpha=0.25))
    assert blend[0, 0].tolist() == [139, 75, 75]  # 0.75 * 100 + 0.25 * 255 = 138.75
    assert np.asarray(overlay(image[..., 0], label, PALETTE, alpha=0.0)).shape == (2, 2, 3)  # grayscale in
    with pytest.raises(SETRConfigError, match="alpha"):
        overlay(image, label, PALETTE, alpha=1.5)
    with pytest.raises(ValueError, match="size"):
        overlay(image[:1], label, PALETTE)


def test_side_by_side_is_image_then_colours():
    image = np.full((2, 2, 3), 100, np.uint8)
    label = np.array([[0, 1], [2, 0]])
    side = np.asarray(side_by_side_image(image[..., 0], label, PALETTE))
    assert side.shape == (2, 4, 3)
    np.testing.assert_array_equal(side[:, :2], image)
    np.testing.assert_array_equal(side[:, 2:], np.asarray(colorize(label, PALETTE).convert("RGB")))
