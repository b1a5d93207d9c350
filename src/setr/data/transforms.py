"""Augmentation pipelines with albumentations, built from config lists.

A pipeline in config is a list of transforms, each a mapping with ``_target_`` (any albumentations transform, or
one of the SETR-specific ones below) and its arguments; :func:`build_pipeline` instantiates them, appends
``Normalize`` + ``ToTensorV2`` and wraps them in one ``A.Compose``. The two recipe-specific transforms follow
mmsegmentation's semantics, which the paper's numbers come from:

* :class:`RandomRescale` = mmseg ``Resize(img_scale, ratio_range, keep_ratio=True)``;
* :class:`CatMaxRatioCrop` = mmseg ``RandomCrop(crop_size, cat_max_ratio)``: crops at most ``crop_size`` and never
  pads. Like mmseg 0.x (``..., PhotoMetricDistortion, Normalize, Pad(size=crop_size, pad_val=0,
  seg_pad_val=255)``), :func:`build_pipeline` pads an image smaller than the crop *after* ``Normalize``, at the
  bottom and right, with 0 (the mean colour) and labels 255 (ignored): the photometric distortion only ever sees
  real pixels, and the padding carries no colour of its own into the network.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import albumentations as A
import cv2
import numpy as np
import torch
from albumentations.augmentations.crops import functional as fcrops
from albumentations.pytorch import ToTensorV2

from setr.errors import SETRConfigError
from setr.values import IGNORE_INDEX


def rescale_size(h: int, w: int, scale: Sequence[int]) -> tuple[int, int]:
    """mmcv ``rescale_size`` with keep-ratio: largest size with long side <= max(scale), short <= min(scale)."""
    long_edge, short_edge = max(scale), min(scale)
    factor = min(long_edge / max(h, w), short_edge / min(h, w))
    return max(1, int(h * factor + 0.5)), max(1, int(w * factor + 0.5))


class RandomRescale(A.DualTransform):
    """Rescale keeping the aspect ratio to ``img_scale`` times a ratio drawn from ``ratio_range``.

    Image bilinear, mask nearest (as mmseg). ``ratio_range=None`` rescales to ``img_scale`` exactly (the
    single-scale test resize).
    """

    class InitSchema(A.core.transforms_interface.BaseTransformInitSchema):
        img_scale: tuple[int, int]
        ratio_range: tuple[float, float] | None = None

    def __init__(self, img_scale: Sequence[int], ratio_range: Sequence[float] | None = (0.5, 2.0),
                 p: float = 1.0) -> None:
        super().__init__(p=p)
        self.img_scale = tuple(int(s) for s in img_scale)
        self.ratio_range = tuple(ratio_range) if ratio_range is not None else None

    def get_params_dependent_on_data(self, params: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
        h, w = params["shape"][:2]
        ratio = 1.0 if self.ratio_range is None else self.py_random.uniform(*self.ratio_range)
        scale = (int(self.img_scale[0] * ratio), int(self.img_scale[1] * ratio))
        return {"size": rescale_size(h, w, scale)}

    def apply(self, img: np.ndarray, size: tuple[int, int] = (0, 0), **params: Any) -> np.ndarray:
        return cv2.resize(img, (size[1], size[0]), interpolation=cv2.INTER_LINEAR)

    def apply_to_mask(self, mask: np.ndarray, size: tuple[int, int] = (0, 0), **params: Any) -> np.ndarray:
        return cv2.resize(mask, (size[1], size[0]), interpolation=cv2.INTER_NEAREST)

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("img_scale", "ratio_range")


def class_counts(mask: np.ndarray, ignore_index: int = IGNORE_INDEX) -> np.ndarray:
    """Pixel counts of the classes present in ``mask`` (ascending class id), ``ignore_index`` left out: what
    ``np.unique(mask[mask != ignore_index], return_counts=True)[1]`` gives, by a histogram for uint8 labels (no
    sort, no copy of a crop's view)."""
    if mask.dtype == np.uint8 and mask.ndim == 2:
        if mask.size < 2**24:  # calcHist counts in float32: exact below 2**24
            counts = cv2.calcHist([mask], [0], None, [256], [0, 256]).ravel().astype(np.int64)
        else:
            counts = np.bincount(mask.ravel(), minlength=256)
        if 0 <= ignore_index < 256:
            counts[ignore_index] = 0
        return counts[counts > 0]
    return np.unique(mask[mask != ignore_index], return_counts=True)[1]


class CatMaxRatioCrop(A.RandomCrop):
    """Random crop of at most ``height`` x ``width`` (smaller where the image is; no padding, see the module
    docstring) whose most frequent class covers at most ``cat_max_ratio`` of the labelled pixels; up to 10 tries,
    as mmseg's ``RandomCrop``. ``ignore_index`` labels are not counted, and are what the later padding writes."""

    class InitSchema(A.core.transforms_interface.BaseTransformInitSchema):
        height: int
        width: int
        cat_max_ratio: float = 1.0
        ignore_index: int = IGNORE_INDEX

    def __init__(self, height: int, width: int, cat_max_ratio: float = 0.75, ignore_index: int = IGNORE_INDEX,
                 p: float = 1.0) -> None:
        super().__init__(height=height, width=width, pad_if_needed=False, p=p)
        self.cat_max_ratio = cat_max_ratio
        self.ignore_index = ignore_index

    def _draw(self, shape: tuple[int, int]) -> dict[str, Any]:
        # albumentations' get_crop_coords clips the crop to the image: mmseg's crop of min(crop, image) per side
        coords = fcrops.get_crop_coords(shape, (self.height, self.width), self.py_random.random(),
                                        self.py_random.random())
        return {"crop_coords": coords, "pad_params": None}

    def get_params_dependent_on_data(self, params: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
        shape = params["shape"][:2]
        out = self._draw(shape)
        mask = data.get("mask")
        if mask is None or self.cat_max_ratio >= 1.0:
            return out
        for _ in range(10):
            x1, y1, x2, y2 = out["crop_coords"]
            counts = class_counts(mask[y1:y2, x1:x2], self.ignore_index)
            if len(counts) > 1 and counts.max() / counts.sum() < self.cat_max_ratio:
                break
            out = self._draw(shape)
        return out

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("height", "width", "cat_max_ratio", "ignore_index")


def build_steps(steps: Sequence[Mapping] | None, key: str = "data.train_pipeline") -> list[A.BasicTransform]:
    """Instantiate pipeline ``steps`` (``_target_`` mappings). Unknown targets or bad arguments raise
    :class:`SETRConfigError` naming the step (``key[i]``)."""
    from hydra.utils import instantiate

    transforms = []
    for i, step in enumerate(steps or []):
        if not isinstance(step, Mapping) or "_target_" not in step:
            raise SETRConfigError(f"{key}[{i}]: each step needs a _target_ (e.g. albumentations.HorizontalFlip)")
        try:
            transforms.append(instantiate(dict(step)))
        except Exception as e:  # Hydra wraps import and argument errors; report one line
            cause = e.__cause__ or e
            raise SETRConfigError(f"{key}[{i}] ({step['_target_']}): {cause}".splitlines()[0]) from e
    return transforms


class NormalizePadToTensor(A.DualTransform):
    """``Normalize(mean, std)`` (0-255 scale) + mmseg's ``Pad`` after it + ``ToTensorV2`` in one step.

    The image comes out as a contiguous float32 ``(3, H, W)`` tensor with ``H, W`` at least ``pad_to`` (bottom and
    right padding of 0, the mean colour after normalisation); the mask as a ``(H, W)`` tensor padded with
    ``fill_mask``. uint8 images are normalised by one float table per channel (``(v - mean) / std`` for the 256
    values), written straight into the padded buffer: no float HWC intermediate, no separate padding copy."""

    def __init__(self, mean: Sequence[float], std: Sequence[float], pad_to: Sequence[int] | None = None,
                 fill_mask: int = IGNORE_INDEX, p: float = 1.0) -> None:
        super().__init__(p=p)
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(v) for v in std)
        self.pad_to = tuple(int(v) for v in pad_to) if pad_to is not None else None
        self.fill_mask = int(fill_mask)
        values = np.arange(256, dtype=np.float64)[:, None]
        tables = ((values - np.float64(self.mean)) / np.float64(self.std)).astype(np.float32)
        self._tables = [np.ascontiguousarray(tables[:, k][None]) for k in range(len(self.mean))]

    def _size(self, h: int, w: int) -> tuple[int, int]:
        return (h, w) if self.pad_to is None else (max(h, self.pad_to[0]), max(w, self.pad_to[1]))

    def apply(self, img: np.ndarray, **params: Any) -> torch.Tensor:
        if img.ndim == 2:
            img = img[..., None]
        h, w, c = img.shape
        if c != len(self.mean):
            raise SETRConfigError(f"normalisation: {len(self.mean)} mean values for an image of {c} channels")
        ph, pw = self._size(h, w)
        out = np.zeros((c, ph, pw), np.float32) if (ph, pw) != (h, w) else np.empty((c, h, w), np.float32)
        if img.dtype == np.uint8:
            for k, plane in enumerate(cv2.split(img)):
                out[k, :h, :w] = cv2.LUT(plane, self._tables[k])
        else:
            norm = (img.astype(np.float32) - np.float32(self.mean)) / np.float32(self.std)
            out[:, :h, :w] = norm.transpose(2, 0, 1)
        return torch.from_numpy(out)

    def apply_to_mask(self, mask: np.ndarray, **params: Any) -> torch.Tensor:
        h, w = mask.shape[:2]
        ph, pw = self._size(h, w)
        if (ph, pw) != (h, w):
            padded = np.full((ph, pw, *mask.shape[2:]), self.fill_mask, dtype=mask.dtype)
            padded[:h, :w] = mask
            mask = padded
        return torch.from_numpy(np.ascontiguousarray(mask))

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("mean", "std", "pad_to", "fill_mask")


def build_pipeline(steps: Sequence[Mapping] | None, mean: Sequence[float], std: Sequence[float],
                   key: str = "data.train_pipeline", seed: int | None = None) -> A.Compose:
    """:func:`build_steps`, then ``Normalize(mean, std)`` (0-255 scale), the padding of every
    :class:`CatMaxRatioCrop` to its size (value 0 after normalisation = the mean colour, labels
    :data:`IGNORE_INDEX`, bottom and right: mmseg's ``Pad`` after ``Normalize``) and ``ToTensorV2``, the three fused
    in one :class:`NormalizePadToTensor`."""
    transforms = build_steps(steps, key)
    crops = [t for t in transforms if isinstance(t, CatMaxRatioCrop)]
    if len({t.ignore_index for t in crops}) > 1:  # crops padding labels differently: one padding step each
        pads = [A.PadIfNeeded(min_height=t.height, min_width=t.width, position="top_left",
                              border_mode=cv2.BORDER_CONSTANT, fill=0, fill_mask=t.ignore_index) for t in crops]
        transforms += [A.Normalize(mean=[m / 255.0 for m in mean], std=[s / 255.0 for s in std],
                                   max_pixel_value=255.0), *pads, ToTensorV2()]
        return A.Compose(transforms, seed=seed)
    pad_to = (max(t.height for t in crops), max(t.width for t in crops)) if crops else None
    fill = crops[0].ignore_index if crops else IGNORE_INDEX
    transforms.append(NormalizePadToTensor(mean, std, pad_to=pad_to, fill_mask=fill))
    return A.Compose(transforms, seed=seed)


class PhotoMetricDistortion(A.ImageOnlyTransform):
    """mmseg ``PhotoMetricDistortion``: each step with probability 1/2 -- brightness shift in
    ``[-brightness_delta, brightness_delta]``, contrast factor in ``contrast_range`` (before or after the colour
    steps, chosen at random), saturation factor in ``saturation_range`` and hue shift in ``[-hue_delta, hue_delta]``
    (OpenCV hue units, 180 = full turn); values are clipped to 0..255 after every step. Image only."""

    def __init__(self, brightness_delta: int = 32, contrast_range: Sequence[float] = (0.5, 1.5),
                 saturation_range: Sequence[float] = (0.5, 1.5), hue_delta: int = 18, p: float = 1.0) -> None:
        super().__init__(p=p)
        self.brightness_delta = int(brightness_delta)
        self.contrast_range = tuple(float(v) for v in contrast_range)
        self.saturation_range = tuple(float(v) for v in saturation_range)
        self.hue_delta = int(hue_delta)

    def get_params(self) -> dict[str, Any]:
        r = self.py_random
        return {
            "beta": r.uniform(-self.brightness_delta, self.brightness_delta) if r.random() < 0.5 else None,
            "contrast_first": r.random() < 0.5,
            "alpha": r.uniform(*self.contrast_range) if r.random() < 0.5 else None,
            "saturation": r.uniform(*self.saturation_range) if r.random() < 0.5 else None,
            "hue": r.randint(-self.hue_delta, self.hue_delta) if r.random() < 0.5 else None,
        }

    @staticmethod
    def _lut(alpha: float = 1.0, beta: float = 0.0) -> np.ndarray:
        """mmseg's ``convert`` (``clip(x * alpha + beta, 0, 255)`` in float32, truncated to uint8) of all 256 values:
        applied with ``cv2.LUT`` it gives the very pixels of the float computation, in one uint8 pass."""
        return np.clip(np.arange(256, dtype=np.float32) * alpha + beta, 0, 255).astype(np.uint8)

    def apply(self, img: np.ndarray, beta: float | None = None, contrast_first: bool = False,
              alpha: float | None = None, saturation: float | None = None, hue: int | None = None,
              **params: Any) -> np.ndarray:
        if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
            raise SETRConfigError(f"PhotoMetricDistortion: expects uint8 RGB images, got {img.dtype} {img.shape}")
        # every step maps each uint8 value on its own (clipped after each): consecutive steps compose as tables
        lut = None
        if beta is not None:
            lut = self._lut(beta=beta)
        if contrast_first and alpha is not None:
            c = self._lut(alpha=alpha)
            lut = c if lut is None else c[lut]
        if lut is not None:
            img = cv2.LUT(img, lut)
        if saturation is not None or hue is not None:
            hsv = cv2.cvtColor(img, cv2.COLOR_RGB2HSV)  # uint8: H in 0..179
            identity = np.arange(256, dtype=np.uint8)
            hue_lut = identity if hue is None else ((identity.astype(np.int32) + hue) % 180).astype(np.uint8)
            sat_lut = identity if saturation is None else self._lut(alpha=saturation)
            hsv = cv2.LUT(hsv, np.stack([hue_lut, sat_lut, identity], axis=-1)[None])
            img = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
        if not contrast_first and alpha is not None:
            img = cv2.LUT(img, self._lut(alpha=alpha))
        return img

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("brightness_delta", "contrast_range", "saturation_range", "hue_delta")
