"""ADE20K (MIT SceneParsing benchmark, ``ADEChallengeData2016.zip``): 150 classes, ``data=ade20k``.

Layout (``ROOT`` = ``data.root``, either the ``ADEChallengeData2016`` folder or the folder holding it)::

    ROOT/ADEChallengeData2016/images/{training,validation}/ADE_*_########.jpg
    ROOT/ADEChallengeData2016/annotations/{training,validation}/ADE_*_########.png

Annotations store 0 for "other / unlabelled" and 1..150 for the classes; as in the SETR recipe
(``reduce_zero_label=True``) 0 becomes 255 (ignored) and ``k`` becomes class ``k - 1``. There are no public test
labels, so the ``test`` split reads ``validation``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from setr.data.base import SegDataset, check_raw_values, reduce_zero_label
from setr.data.layout import files_by_key, pair_files, require_dir, resolve_root, split_folder
from setr.data.palettes import ADE20K_CLASSES, ADE20K_PALETTE
from setr.data.registry import register_dataset
from setr.values import IGNORE_INDEX

LAYOUT = "ADEChallengeData2016/{images,annotations}/{training,validation}"
SPLITS = {"train": "training", "val": "validation", "test": "validation",
          "training": "training", "validation": "validation"}


@register_dataset("ade20k")
class ADE20K(SegDataset):
    """ADE20K scene parsing, 150 classes (``reduce_zero_label``)."""

    class_names = ADE20K_CLASSES
    palette = ADE20K_PALETTE

    def __init__(self, split: str = "train", root: str | Path = "data/ade20k", transform=None,
                 keep_original_mask: bool = False, skip_bad: bool = False) -> None:
        super().__init__(transform=transform, keep_original_mask=keep_original_mask, skip_bad=skip_bad)
        folder = split_folder(split, SPLITS, "ADE20K")
        self.split = split
        base = resolve_root(root, "ADE20K", LAYOUT, ("ADEChallengeData2016",), "images")
        img_dir = require_dir(base / "images" / folder, "ADE20K", LAYOUT)
        ann_dir = require_dir(base / "annotations" / folder, "ADE20K", LAYOUT)
        self.root = base
        self.samples = pair_files(files_by_key(img_dir), files_by_key(ann_dir, exts=(".png",)), img_dir, ann_dir,
                                  skip_bad, self.skipped)

    def map_labels(self, raw: np.ndarray, path: str | Path) -> np.ndarray:
        n = len(ADE20K_CLASSES)
        check_raw_values(raw, lambda v: ((v >= 0) & (v <= n)) | (v == IGNORE_INDEX), path,
                         f"ADE20K annotations hold 0 = unlabelled, 1..{n} = the classes, 255 = ignored")
        return reduce_zero_label(raw)
