"""Dataset base class shared by every dataset (synthetic, ADE20K, Cityscapes, Pascal Context, folder).

A dataset knows nothing of Lightning. It yields dicts:

* ``image``: float tensor ``(3, H, W)`` after the transform (normalised), or uint8 ``(H, W, 3)`` without one;
* ``mask``: long tensor ``(H, W)`` of class ids ``0..num_classes-1`` and :data:`IGNORE_INDEX`;
* ``index``: the sample's position, so predictions can be traced back to ``samples[index]``.

Subclasses fill :attr:`samples` (pairs of image and mask paths, or anything :meth:`load` understands) and
override :meth:`load` / :meth:`map_labels`. Bad files raise :class:`setr.errors.DataError` naming the file.
:meth:`check_sample` is what the pre-flight check (:mod:`setr.data.check`, ``data.check``) runs on every sample
when the dataset is built; with ``skip_bad=True`` the samples it rejects are left out and listed in
:attr:`skipped` instead.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from setr.errors import DataError
from setr.values import IGNORE_INDEX


def default_palette(n: int, seed: int = 7) -> list[tuple[int, int, int]]:
    """A fixed, well-spread colour per class (deterministic)."""
    rng = np.random.default_rng(seed)
    return [tuple(int(c) for c in rng.integers(0, 256, 3)) for _ in range(n)]


# label images hold one class id per pixel: one channel, 8 or 16 bits or 32-bit integers (palette: the indices)
MASK_MODES = ("L", "P", "I", "I;16", "I;16B", "I;16L", "1")


@contextmanager
def open_image(path: str | Path, what: str = "image") -> Iterator[Image.Image]:
    """``PIL.Image.open`` (which reads only the header; pixels are decoded by ``load``) with every way a file can
    be missing, unreadable or truncated turned into one :class:`DataError` line naming it."""
    try:
        with Image.open(path) as im:
            yield im
    except DataError:
        raise  # already one line naming the file (a DataError is a ValueError too)
    except FileNotFoundError as e:
        raise DataError(f"{path}: {what} file not found") from e
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise DataError(f"{path}: unreadable or truncated {what} ({e})") from e


def check_mask_mode(im: Image.Image, path: str | Path) -> None:
    """A colour label image (RGB: a rendering of the classes, not their ids) would be read as garbage ids."""
    if im.mode not in MASK_MODES:
        raise DataError(f"{path}: label image has mode {im.mode}; expected one channel of class ids")


def _cv2_decode(path: str | Path, im: Image.Image, channels: int) -> np.ndarray | None:
    """Decode with OpenCV (faster than PIL, same pixels for these files) the 8-bit ``channels``-channel JPEGs and
    PNGs whose header PIL has read as ``im``; None where PIL must decode (other formats and modes, truncated files
    -- OpenCV would decode a truncated JPEG without a word -- or anything OpenCV reads differently)."""
    if im.format not in ("JPEG", "PNG"):
        return None
    buf = np.fromfile(path, dtype=np.uint8)
    if im.format == "JPEG" and not (buf[-2:] == (0xFF, 0xD9)).all():  # no end-of-image marker last: let PIL judge
        return None
    arr = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED)  # UNCHANGED: no EXIF rotation, as PIL
    if arr is None or arr.dtype != np.uint8 or arr.shape != (im.height, im.width, channels)[: 2 + (channels > 1)]:
        return None
    return cv2.cvtColor(arr, cv2.COLOR_BGR2RGB) if channels == 3 else arr


def read_image(path: str | Path) -> np.ndarray:
    """Read an image file as RGB uint8 ``(H, W, 3)``; grayscale, RGBA, palette and 16-bit inputs are converted."""
    with open_image(path) as im:
        if im.mode == "RGB" and "transparency" not in im.info:
            arr = _cv2_decode(path, im, 3)
            if arr is not None:
                return arr
        im.load()
        if im.mode in ("I;16", "I;16B", "I;16L", "I"):
            arr = np.asarray(im, dtype=np.float64)
            hi = arr.max() if arr.max() > 0 else 1.0
            arr = (arr / hi * 255.0).round().astype(np.uint8)
            return np.stack([arr] * 3, axis=-1)
        return np.asarray(im.convert("RGB"))


def read_mask(path: str | Path, dtype: type | None = np.int64) -> np.ndarray:
    """Read a label image as its raw integer values ``(H, W)`` (palette indices, not colours), as ``dtype``
    (None: as stored, uint8 for 8-bit files -- what the datasets read, 8 times less memory than int64)."""
    with open_image(path, "label image") as im:
        check_mask_mode(im, path)
        arr = _cv2_decode(path, im, 1) if im.mode == "L" else None
        if arr is None:
            im.load()
            arr = np.asarray(im)
            if arr.dtype == bool or arr.dtype.kind not in "iu":
                arr = arr.astype(np.int64)
        return arr if dtype is None else arr.astype(dtype, copy=False)


def check_raw_values(raw: np.ndarray, allowed: Callable[[np.ndarray], np.ndarray], path: str | Path,
                     what: str) -> None:
    """Raise one line naming ``path`` and the first offending values when some raw label values are not
    ``allowed`` (a boolean function of the array); ``what`` says which values are valid. Values are never
    relabelled silently: a wrong label file is reported, not trained on."""
    if raw.dtype == np.uint8:  # judge the 256 values once, then look the pixels up
        bad_values = (~allowed(np.arange(256))).astype(np.uint8)
        if not bad_values.any() or not cv2.LUT(raw, bad_values).any():
            return
    bad = ~allowed(raw)
    if bad.any():
        values = sorted(int(v) for v in np.unique(raw[bad]))
        shown = ", ".join(map(str, values[:5])) + (", ..." if len(values) > 5 else "")
        raise DataError(f"{path}: label values [{shown}] are not valid ({what})")


def reduce_zero_label(raw: np.ndarray) -> np.ndarray:
    """0 -> 255 (ignored), ``v -> v - 1`` for the others, 255 stays 255 (mmseg ``reduce_zero_label``). uint8 labels
    stay uint8 (one table look-up), others become int64."""
    if raw.dtype == np.uint8:
        return cv2.LUT(raw, _REDUCE_ZERO_LUT)
    out = raw.astype(np.int64) - 1
    out[raw == 0] = IGNORE_INDEX
    out[raw == IGNORE_INDEX] = IGNORE_INDEX
    return out


_REDUCE_ZERO_LUT = np.concatenate([[IGNORE_INDEX], np.arange(255), [IGNORE_INDEX]]).astype(np.uint8)[:256]
_REDUCE_ZERO_LUT[255] = IGNORE_INDEX


class SegDataset(torch.utils.data.Dataset):
    """Base class: ``samples`` + ``load`` + an albumentations transform.

    Args:
        transform: an albumentations ``Compose`` called as ``transform(image=..., mask=...)``; None returns raw
            arrays.
        keep_original_mask: apply ``transform`` to the image only and return the mask at its original size (how
            validation is scored in mmsegmentation: logits are resized to the label).
        skip_bad: leave out (and list in :attr:`skipped`) the samples that the listing and the pre-flight check
            reject, instead of raising.
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
        """Return ``(image uint8 HxWx3 RGB, mask HxW of class ids / 255)`` for sample ``index``: the mask uint8
        for 8-bit label files (as the augmentations want it), else int64."""
        img_path, mask_path = self.samples[index]
        image = read_image(img_path)
        mask = self.map_labels(read_mask(mask_path, dtype=None), mask_path)
        if mask.dtype != np.uint8:
            mask = mask.astype(np.int64, copy=False)
        self.check_pair(image.shape[:2], mask.shape[:2], img_path, mask_path)
        return image, mask

    def map_labels(self, raw: np.ndarray, path: str | Path) -> np.ndarray:
        """Map raw label values to ``0..C-1`` / 255; the default checks they already are."""
        return self.check_labels(raw, path)

    def sample_files(self, index: int) -> tuple[Path, Path] | None:
        """The image and label files of sample ``index`` (what the pre-flight check opens), or None for datasets
        whose samples are not files (generated ones have nothing to check)."""
        img_path, mask_path = self.samples[index][:2]
        return Path(img_path), Path(mask_path)

    # -- helpers ------------------------------------------------------------------------------------
    def check_labels(self, mask: np.ndarray, path: str | Path) -> np.ndarray:
        n, ignore = self.num_classes, self.ignore_index
        check_raw_values(mask, lambda v: ((v >= 0) & (v < n)) | (v == ignore), path,
                         f"the {n} classes are 0..{n - 1}, {ignore} is ignored")
        return mask

    @staticmethod
    def check_pair(image_hw: tuple[int, int], mask_hw: tuple[int, int], img_path, mask_path) -> None:
        """Image and label of one sample must have one size (``(height, width)`` each)."""
        if tuple(image_hw) != tuple(mask_hw):
            raise DataError(f"{mask_path}: label size {mask_hw[1]}x{mask_hw[0]} differs from image {img_path} "
                            f"size {image_hw[1]}x{image_hw[0]}")

    def check_sample(self, index: int, level: str = "quick") -> None:
        """Raise one :class:`DataError` line naming the file if sample ``index`` cannot be trained on.

        ``quick`` opens both files' headers only (no pixels decoded: milliseconds per sample): they exist, are
        images, have one size, and the label has one channel. ``full`` also decodes both and maps the labels
        through :meth:`map_labels`, exactly as training will (:meth:`load`), so truncated pixel data and label
        values outside the classes are found too."""
        files = self.sample_files(index)
        if files is None or level == "off":
            return
        img_path, mask_path = files
        with open_image(img_path) as im:
            image_hw = (im.height, im.width)
        with open_image(mask_path, "label image") as m:
            check_mask_mode(m, mask_path)
            mask_hw = (m.height, m.width)
        self.check_pair(image_hw, mask_hw, img_path, mask_path)
        if level == "full":
            self.load(index)

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        """``dataset[i]``, or ``dataset[(i, seed)]`` to draw the augmentation with that seed (reproducible
        and resumable training: the sampler fixes the seed of every sample)."""
        index, seed = key if isinstance(key, tuple) else (key, None)
        if seed is not None and hasattr(self.transform, "set_random_seed"):
            self.transform.set_random_seed(seed)
        image, mask = self.load(index)
        if mask.dtype != np.uint8 and mask.max(initial=0) <= 255 and mask.min(initial=0) >= 0:
            mask = mask.astype(np.uint8)
        if self.transform is not None:
            if self.keep_original_mask:
                image = self.transform(image=image)["image"]
            else:
                out = self.transform(image=image, mask=mask)
                image, mask = out["image"], out["mask"]
        if not isinstance(mask, torch.Tensor):
            mask = torch.from_numpy(np.ascontiguousarray(mask))
        return {"image": image, "mask": mask.long(), "index": index}
