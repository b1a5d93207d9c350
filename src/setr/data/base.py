"""Dataset base class shared by every dataset (synthetic, ADE20K, Cityscapes, Pascal Context, folder).

A dataset knows nothing of Lightning. It yields dicts:

* ``image``: float tensor ``(3, H, W)`` after the transform (normalised), or uint8 ``(H, W, 3)`` without one;
* ``mask``: long tensor ``(H, W)`` of class ids ``0..num_classes-1`` and :data:`IGNORE_INDEX`;
* ``index``: the sample's position, so predictions can be traced back to ``samples[index]``.

Subclasses fill :attr:`samples` (pairs of image and mask paths, or anything :meth:`load` understands) and
override :meth:`load` / :meth:`map_labels`. Bad files raise :class:`setr.errors.DataError` naming the file, or,
with ``skip_bad=True``, are skipped and counted in :attr:`skipped` (checked once, when the dataset is built).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from setr.errors import DataError

IGNORE_INDEX = 255
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def default_palette(n: int, seed: int = 7) -> list[tuple[int, int, int]]:
    """A fixed, well-spread colour per class (deterministic)."""
    rng = np.random.default_rng(seed)
    return [tuple(int(c) for c in rng.integers(0, 256, 3)) for _ in range(n)]


def read_image(path: str | Path) -> np.ndarray:
    """Read an image file as RGB uint8 ``(H, W, 3)``; grayscale, RGBA, palette and 16-bit inputs are converted."""
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode in ("I;16", "I;16B", "I;16L", "I"):
                arr = np.asarray(im, dtype=np.float64)
                hi = arr.max() if arr.max() > 0 else 1.0
                arr = (arr / hi * 255.0).round().astype(np.uint8)
                return np.stack([arr] * 3, axis=-1)
            return np.asarray(im.convert("RGB"))
    except FileNotFoundError as e:
        raise DataError(f"{path}: image file not found") from e
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise DataError(f"{path}: unreadable or truncated image ({e})") from e


def read_mask(path: str | Path) -> np.ndarray:
    """Read a label image as its raw integer values ``(H, W)`` (palette indices, not colours)."""
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode not in ("L", "P", "I", "I;16", "I;16B", "I;16L", "1"):
                raise DataError(f"{path}: label image has mode {im.mode}; expected one channel of class ids")
            return np.asarray(im).astype(np.int64)
    except FileNotFoundError as e:
        raise DataError(f"{path}: label file not found") from e
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise DataError(f"{path}: unreadable or truncated label image ({e})") from e


class SegDataset(torch.utils.data.Dataset):
    """Base class: ``samples`` + ``load`` + an albumentations transform.

    Args:
        transform: an albumentations ``Compose`` called as ``transform(image=..., mask=...)``; None returns raw
            arrays.
        keep_original_mask: apply ``transform`` to the image only and return the mask at its original size (how
            validation is scored in mmsegmentation: logits are resized to the label).
        skip_bad: check every sample once at start and skip (and count) bad ones instead of raising.
    """

    class_names: Sequence[str] = ()
    palette: Sequence[tuple[int, int, int]] = ()
    ignore_index: int = IGNORE_INDEX

    def __init__(self, transform: Callable | None = None, keep_original_mask: bool = False,
                 skip_bad: bool = False) -> None:
        self.transform = transform
        self.keep_original_mask = keep_original_mask
        self.skip_bad = skip_bad
        self.samples: list[Any] = []
        self.skipped: list[str] = []

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __len__(self) -> int:
        return len(self.samples)

    # -- to override ------------------------------------------------------------------------------
    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Return ``(image uint8 HxWx3 RGB, mask int64 HxW of class ids / 255)`` for sample ``index``."""
        img_path, mask_path = self.samples[index]
        image = read_image(img_path)
        mask = self.map_labels(read_mask(mask_path), mask_path)
        self.check_pair(image, mask, img_path, mask_path)
        return image, mask

    def map_labels(self, raw: np.ndarray, path: str | Path) -> np.ndarray:
        """Map raw label values to ``0..C-1`` / 255; the default checks they already are."""
        return self.check_labels(raw, path)

    # -- helpers ------------------------------------------------------------------------------------
    def check_labels(self, mask: np.ndarray, path: str | Path) -> np.ndarray:
        bad = (mask >= self.num_classes) & (mask != self.ignore_index) | (mask < 0)
        if bad.any():
            values = sorted(int(v) for v in np.unique(mask[bad]))[:5]
            raise DataError(
                f"{path}: label values {values} are outside the {self.num_classes} classes "
                f"(0..{self.num_classes - 1}) and the ignore value {self.ignore_index}"
            )
        return mask

    @staticmethod
    def check_pair(image: np.ndarray, mask: np.ndarray, img_path, mask_path) -> None:
        if image.shape[:2] != mask.shape[:2]:
            raise DataError(
                f"{mask_path}: label size {mask.shape[1]}x{mask.shape[0]} differs from image {img_path} "
                f"size {image.shape[1]}x{image.shape[0]}"
            )

    def validate(self) -> None:
        """With ``skip_bad``: load every sample once, drop the bad ones and record them in :attr:`skipped`."""
        if not self.skip_bad:
            return
        good = []
        for i, s in enumerate(self.samples):
            try:
                self.load(i)
                good.append(s)
            except DataError as e:
                self.skipped.append(str(e))
        self.samples = good

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        """``dataset[i]``, or ``dataset[(i, seed)]`` to draw the augmentation with that seed (reproducible
        and resumable training: the sampler fixes the seed of every sample)."""
        index, seed = key if isinstance(key, tuple) else (key, None)
        if seed is not None and hasattr(self.transform, "set_random_seed"):
            self.transform.set_random_seed(seed)
        image, mask = self.load(index)
        mask = mask.astype(np.uint8) if mask.max(initial=0) <= 255 else mask
        if self.transform is not None:
            if self.keep_original_mask:
                image = self.transform(image=image)["image"]
            else:
                out = self.transform(image=image, mask=mask)
                image, mask = out["image"], out["mask"]
        return {"image": image, "mask": torch.as_tensor(np.asarray(mask), dtype=torch.long), "index": index}
