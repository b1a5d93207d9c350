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

import cv2
import numpy as np

from setr.data.base import SegDataset, check_raw_values
from setr.data.layout import files_by_key, pair_files, require_dir, resolve_root, split_folder
from setr.data.palettes import CITYSCAPES_CLASSES, CITYSCAPES_NUM_LABEL_IDS, CITYSCAPES_PALETTE, cityscapes_lut
from setr.data.registry import register_dataset
from setr.errors import DataError, SETRConfigError
from setr.values import IGNORE_INDEX

LAYOUT = "leftImg8bit/<split>/<city>/*_leftImg8bit.png and gtFine/<split>/<city>/*_gtFine_labelIds.png"
IMAGE_SUFFIX = "_leftImg8bit"
LABEL_IDS_SUFFIX = "_gtFine_labelIds"
TRAIN_IDS_SUFFIX = "_gtFine_labelTrainIds"
LABEL_TYPES = ("auto", "train_ids", "label_ids")
SPLITS = {"train": "train", "val": "val", "test": "val"}
_LUT = cityscapes_lut()


def label_ids_to_train_ids(raw: np.ndarray, path: str | Path) -> np.ndarray:
    """Map a ``*_gtFine_labelIds.png`` array (ids 0..33; 255 = the license plate's -1) to train ids
    (0..18, 255). Any other value raises one line naming ``path``. uint8 input gives uint8 (one ``cv2.LUT``
    pass), any other int64."""
    check_raw_values(raw, lambda v: ((v >= 0) & (v < CITYSCAPES_NUM_LABEL_IDS)) | (v == IGNORE_INDEX), path,
                     f"Cityscapes labelIds are 0..{CITYSCAPES_NUM_LABEL_IDS - 1} (255 = license plate)")
    if raw.dtype == np.uint8:
        return cv2.LUT(raw, _LUT)
    return _LUT[raw.astype(np.int64)].astype(np.int64)


@register_dataset("cityscapes")
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
        if label_type not in LABEL_TYPES:
            raise SETRConfigError(f"data.dataset.label_type: {label_type!r}; choose one of {', '.join(LABEL_TYPES)}")
        if test_split not in ("val", "test"):
            raise SETRConfigError(f"data.dataset.test_split: {test_split!r}; use val or test")
        self.split = split
        self.label_type = label_type
        folder = test_split if split == "test" else split_folder(split, SPLITS, "Cityscapes")
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
        # auto: the converted *_labelTrainIds.png where there is one, else the *_labelIds.png
        masks = {"auto": {**label_ids, **train_ids}, "label_ids": label_ids, "train_ids": train_ids}[label_type]
        names = {"auto": f"*{LABEL_IDS_SUFFIX}.png or *{TRAIN_IDS_SUFFIX}.png", "label_ids": f"*{LABEL_IDS_SUFFIX}.png",
                 "train_ids": f"*{TRAIN_IDS_SUFFIX}.png"}[label_type]
        self.samples = pair_files(images, masks, img_dir, gt_dir, skip_bad, self.skipped,
                                  wanted=f"label file ({names})")

    def map_labels(self, raw: np.ndarray, path: str | Path) -> np.ndarray:
        """``*_labelIds.png`` are mapped to train ids; ``*_labelTrainIds.png`` already hold them (checked)."""
        if Path(path).stem.endswith(LABEL_IDS_SUFFIX):
            return label_ids_to_train_ids(raw, path)
        return self.check_labels(raw, path)
