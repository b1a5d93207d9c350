"""Cityscapes (``leftImg8bit_trainvaltest.zip`` + ``gtFine_trainvaltest.zip``): 19 classes, ``data=cityscapes``.

Layout (``ROOT`` = ``data.root``)::

    ROOT/leftImg8bit/{train,val,test}/<city>/<city>_<seq>_<frame>_leftImg8bit.png
    ROOT/gtFine/{train,val,test}/<city>/<city>_<seq>_<frame>_gtFine_labelIds.png
                                       (and, after ``python -m setr.data.convert cityscapes ROOT``,
                                        <city>_<seq>_<frame>_gtFine_labelTrainIds.png)

Labels: ``*_labelTrainIds.png`` (0..18, 255) are read as they are when present; otherwise ``*_labelIds.png``
(the 34 Cityscapes ids) are mapped on the fly with the official ``labelId -> trainId`` table, which gives the
same labels (tested). Every id that is not one of the 19 evaluated classes becomes 255. The official test labels
are not public, so the ``test`` split reads ``val``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from setr.data.base import IGNORE_INDEX, SegDataset, read_image, read_mask
from setr.data.folder import check_raw_values, files_by_key, require_dir, resolve_root
from setr.data.palettes import CITYSCAPES_CLASSES, CITYSCAPES_NUM_LABEL_IDS, CITYSCAPES_PALETTE, cityscapes_lut
from setr.data.registry import register_dataset
from setr.errors import DataError, SETRConfigError

LAYOUT = "leftImg8bit/<split>/<city>/*_leftImg8bit.png and gtFine/<split>/<city>/*_gtFine_labelIds.png"
IMAGE_SUFFIX = "_leftImg8bit"
LABEL_IDS_SUFFIX = "_gtFine_labelIds"
TRAIN_IDS_SUFFIX = "_gtFine_labelTrainIds"
LABEL_TYPES = ("auto", "train_ids", "label_ids")
SPLITS = {"train": "train", "val": "val", "test": "val"}
_LUT = cityscapes_lut()


def label_ids_to_train_ids(raw: np.ndarray, path: str | Path) -> np.ndarray:
    """Map a ``*_gtFine_labelIds.png`` array (ids 0..33; 255 = the license plate's -1) to train ids
    (0..18, 255). Any other value raises one line naming ``path``."""
    check_raw_values(raw, lambda v: ((v >= 0) & (v < CITYSCAPES_NUM_LABEL_IDS)) | (v == IGNORE_INDEX), path,
                     f"Cityscapes labelIds are 0..{CITYSCAPES_NUM_LABEL_IDS - 1} (255 = license plate)")
    return _LUT[raw.astype(np.int64)].astype(np.int64)


class Cityscapes(SegDataset):
    """Cityscapes fine annotations, 19 train classes.

    Args:
        label_type: ``auto`` (``*_labelTrainIds.png`` where present, else ``*_labelIds.png`` mapped),
            ``train_ids`` (require the converted files) or ``label_ids`` (always map the original ids).
        test_split: the folder the ``test`` split reads (``val``: the test labels are not public).
    """

    class_names = CITYSCAPES_CLASSES
    palette = CITYSCAPES_PALETTE

    def __init__(self, split: str = "train", root: str | Path = "data/cityscapes", transform=None,
                 keep_original_mask: bool = False, skip_bad: bool = False, label_type: str = "auto",
                 test_split: str = "val") -> None:
        super().__init__(transform=transform, keep_original_mask=keep_original_mask, skip_bad=skip_bad)
        if split not in SPLITS:
            raise SETRConfigError(f"data.split: unknown Cityscapes split {split!r}; use train, val or test")
        if label_type not in LABEL_TYPES:
            raise SETRConfigError(f"data.dataset.label_type: {label_type!r}; choose one of {', '.join(LABEL_TYPES)}")
        if test_split not in ("val", "test"):
            raise SETRConfigError(f"data.dataset.test_split: {test_split!r}; use val or test")
        self.split = split
        self.label_type = label_type
        folder = test_split if split == "test" else SPLITS[split]
        base = resolve_root(root, "Cityscapes", LAYOUT, ("cityscapes",), "leftImg8bit")
        img_dir = require_dir(base / "leftImg8bit" / folder, "Cityscapes", LAYOUT)
        gt_dir = require_dir(base / "gtFine" / folder, "Cityscapes", LAYOUT)
        self.root = base
        images = files_by_key(img_dir, suffix=IMAGE_SUFFIX, exts=(".png",), recursive=True)
        label_ids = files_by_key(gt_dir, suffix=LABEL_IDS_SUFFIX, exts=(".png",), recursive=True)
        train_ids = files_by_key(gt_dir, suffix=TRAIN_IDS_SUFFIX, exts=(".png",), recursive=True)
        if label_type == "train_ids" and not train_ids and label_ids:
            raise DataError(f"{gt_dir}: no *{TRAIN_IDS_SUFFIX}.png files; run `python -m setr.data.convert "
                            f"cityscapes {base}` or set data.dataset.label_type=auto")
        masks: dict[str, tuple[Path, str]] = {}
        if label_type in ("auto", "label_ids"):
            masks.update({k: (p, "label_ids") for k, p in label_ids.items()})
        if label_type in ("auto", "train_ids"):
            masks.update({k: (p, "train_ids") for k, p in train_ids.items()})
        self.samples = self._pair(images, masks, img_dir, gt_dir)

    def _pair(self, images: dict[str, Path], masks: dict[str, tuple[Path, str]], img_dir: Path,
              gt_dir: Path) -> list[tuple[Path, Path, str]]:
        no_mask = sorted(set(images) - set(masks))
        no_image = sorted(set(masks) - set(images))
        wanted = {"auto": f"{LABEL_IDS_SUFFIX}.png or {TRAIN_IDS_SUFFIX}.png", "label_ids": f"{LABEL_IDS_SUFFIX}.png",
                  "train_ids": f"{TRAIN_IDS_SUFFIX}.png"}[self.label_type]
        if (no_mask or no_image) and not self.skip_bad:
            if no_mask:
                k = no_mask[0]
                what = f"no label *{wanted} for {images[k].relative_to(img_dir)}"
            else:
                k = no_image[0]
                what = f"no image for label {masks[k][0].relative_to(gt_dir)}"
            more = len(no_mask) + len(no_image) - 1
            raise DataError(f"{gt_dir}: {len(images)} images in {img_dir} but {len(masks)} label files; {what}"
                            + (f" (+{more} more)" if more else "") + " (set data.skip_bad=true to skip them)")
        self.skipped += [f"{images[k]}: no label file in {gt_dir}" for k in no_mask]
        self.skipped += [f"{masks[k][0]}: no image in {img_dir}" for k in no_image]
        return [(images[k], *masks[k]) for k in sorted(set(images) & set(masks))]

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        img_path, mask_path, kind = self.samples[index]
        image = read_image(img_path)
        raw = read_mask(mask_path)
        mask = label_ids_to_train_ids(raw, mask_path) if kind == "label_ids" else self.check_labels(raw, mask_path)
        self.check_pair(image, mask, img_path, mask_path)
        return image, mask


register_dataset("cityscapes", Cityscapes)
