"""PASCAL-Context on VOC2010: 60 classes (``data=pascal_context``) or 59 (``data=pascal_context_59``).

Layout (``ROOT`` = ``data.root``: the ``VOC2010`` folder, or a folder holding ``VOC2010`` or
``VOCdevkit/VOC2010``)::

    VOC2010/JPEGImages/<id>.jpg
    VOC2010/SegmentationClassContext/<id>.png              (written by the converter, values 0..59)
    VOC2010/ImageSets/SegmentationContext/{train,val}.txt  (written by the converter, one <id> a line)

The label PNGs come from the official Detail-API annotations (``trainval_merged.json``):
``python -m setr.data.convert pascal_context ROOT --json trainval_merged.json`` (see :mod:`setr.data.convert`).

* 60 classes (SETR's setting, mmseg ``PascalContextDataset``): class 0 is ``background`` (every pixel outside
  the 59 object/stuff classes), 1..59 the classes; 255 is ignored.
* 59 classes (mmseg ``PascalContextDataset59``): background is ignored and the others shift down by one
  (``reduce_zero_label``).

There is no labelled test split: ``test`` reads ``val``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from setr.data.base import SegDataset, check_raw_values, reduce_zero_label
from setr.data.layout import files_by_key, pair_listed, read_split_list, require_dir, resolve_root, split_folder
from setr.data.palettes import (
    PASCAL_CONTEXT_59_CLASSES,
    PASCAL_CONTEXT_59_PALETTE,
    PASCAL_CONTEXT_CLASSES,
    PASCAL_CONTEXT_PALETTE,
)
from setr.data.registry import register_dataset
from setr.errors import DataError
from setr.values import IGNORE_INDEX

LAYOUT = ("VOC2010/{JPEGImages,SegmentationClassContext,ImageSets/SegmentationContext/{train,val}.txt} "
          "(or VOCdevkit/VOC2010/...)")
SPLITS = {"train": "train", "val": "val", "test": "val"}
CONVERT_HINT = "create it with `python -m setr.data.convert pascal_context ROOT --json trainval_merged.json`"


@register_dataset("pascal_context")
class PascalContext(SegDataset):
    """PASCAL-Context, 60 classes (background = class 0)."""

    class_names = PASCAL_CONTEXT_CLASSES
    palette = PASCAL_CONTEXT_PALETTE
    reduce_zero_label = False

    def __init__(self, split: str = "train", root: str | Path = "data/pascal_context", transform=None,
                 keep_original_mask: bool = False, skip_bad: bool = False) -> None:
        super().__init__(transform=transform, keep_original_mask=keep_original_mask, skip_bad=skip_bad)
        list_name = split_folder(split, SPLITS, "Pascal Context")
        self.split = split
        base = resolve_root(root, "Pascal Context", LAYOUT, ("VOC2010", "VOCdevkit/VOC2010"), "JPEGImages")
        self.root = base
        img_dir = base / "JPEGImages"
        mask_dir = require_dir(base / "SegmentationClassContext", "Pascal Context", LAYOUT, CONVERT_HINT)
        list_path = base / "ImageSets" / "SegmentationContext" / f"{list_name}.txt"
        if not list_path.is_file():
            raise DataError(f"{list_path}: split list not found; {CONVERT_HINT}")
        ids = read_split_list(list_path)
        if not ids:
            raise DataError(f"{list_path}: the split list is empty")
        self.samples = pair_listed(ids, list_path, files_by_key(img_dir, exts=(".jpg",)),
                                   files_by_key(mask_dir, exts=(".png",)), img_dir, mask_dir, skip_bad, self.skipped)

    def map_labels(self, raw: np.ndarray, path: str | Path) -> np.ndarray:
        n = len(PASCAL_CONTEXT_CLASSES)
        check_raw_values(raw, lambda v: ((v >= 0) & (v < n)) | (v == IGNORE_INDEX), path,
                         f"Pascal Context labels are 0 = background, 1..{n - 1} the classes, 255 = ignored")
        return reduce_zero_label(raw) if self.reduce_zero_label else raw


@register_dataset("pascal_context_59")
class PascalContext59(PascalContext):
    """PASCAL-Context, 59 classes: background ignored, labels shifted down by one."""

    class_names = PASCAL_CONTEXT_59_CLASSES
    palette = PASCAL_CONTEXT_59_PALETTE
    reduce_zero_label = True
