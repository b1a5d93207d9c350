"""Your own data: a folder of images and a folder of label masks with matching file names (``data=folder``).

Layouts (``ROOT`` = ``data.root``)::

    ROOT/images/<split>/<stem>.jpg|png|...      ROOT/images/<stem>.jpg|png|...
    ROOT/masks/<split>/<stem>.png          or   ROOT/masks/<stem>.png
    ROOT/classes.yaml                           ROOT/splits/<split>.txt  (or ROOT/<split>.txt): one stem a line
                                                ROOT/classes.yaml

Masks hold one class id per pixel (``0..C-1``, 255 = ignore; 8-bit grayscale or palette PNG, whose *indices* are
the ids). With ``reduce_zero_label: true`` the masks hold ``1..C`` and 0 is ignored (ADE20K style).

``classes.yaml`` (or the file named by ``classes_file``) lists the classes in id order, each a name or a mapping
with a name and an RGB colour::

    classes:
      - {name: background, color: [0, 0, 0]}
      - {name: road, color: [128, 64, 128]}
      - building                 # no colour: a fixed generated one

Finding and pairing the files goes through :mod:`setr.data.layout`, as for every other dataset. When the training
crop (``data.crop_size``, passed as ``crop_size``) is larger than every training image, the pre-flight check
(:mod:`setr.data.check`) ends with one hint line naming the crop to set, from the image sizes its header reads
found (no extra read of the files).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import yaml

from setr.data.base import SegDataset, check_raw_values, default_palette, reduce_zero_label
from setr.data.layout import (
    README_HINT,
    files_by_key,
    pair_files,
    pair_listed,
    read_split_list,
    require_dir,
    resolve_root,
)
from setr.data.registry import register_dataset
from setr.errors import DataError, SETRConfigError
from setr.values import IGNORE_INDEX, size_pair

log = logging.getLogger("setr")

# the hints given in this process: one line per image folder and crop, also when one split is built twice
# (debug=overfit validates on the training split)
_hinted: set[tuple[str, tuple[int, int]]] = set()


# ------------------------------------------------------------------------------------------ classes file
def load_classes(path: Path) -> tuple[list[str], list[tuple[int, int, int]]]:
    """Read class names and colours from a YAML file (see the module docstring)."""
    if not path.is_file():
        raise DataError(f"{path}: classes file not found; write one (classes: [names or {{name, color}}]) "
                        f"or set data.dataset.classes_file ({README_HINT})")
    try:
        doc = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise DataError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from e
    entries = doc.get("classes") if isinstance(doc, dict) else doc
    if not isinstance(entries, list) or not entries:
        raise DataError(f"{path}: expected a non-empty list under 'classes:' (names or {{name, color}} mappings)")
    names: list[str] = []
    colours: list[tuple[int, int, int] | None] = []
    for i, e in enumerate(entries):
        if isinstance(e, str):
            names.append(e)
            colours.append(None)
            continue
        if not isinstance(e, dict) or not isinstance(e.get("name"), str):
            raise DataError(f"{path}: class {i} must be a name or a mapping with a 'name' (got {e!r})")
        names.append(e["name"])
        colour = e.get("color", e.get("colour"))
        if colour is None:
            colours.append(None)
        elif (isinstance(colour, (list, tuple)) and len(colour) == 3
              and all(isinstance(c, int) and 0 <= c <= 255 for c in colour)):
            colours.append(tuple(colour))
        else:
            raise DataError(f"{path}: class {i} ({e['name']}) has colour {colour!r}; expected [r, g, b] in 0..255")
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise DataError(f"{path}: class name {dup!r} appears twice")
    if len(names) >= IGNORE_INDEX:
        raise DataError(f"{path}: {len(names)} classes; at most {IGNORE_INDEX - 1} fit next to the ignore value 255")
    fallback = default_palette(len(names))
    return names, [c if c is not None else fallback[i] for i, c in enumerate(colours)]


# ------------------------------------------------------------------------------------------ dataset
@register_dataset("folder")
class FolderDataset(SegDataset):
    """Images and masks with matching stems, classes from a YAML file.

    Args:
        split: ``train``, ``val``, ``test`` or any folder / list name. ``test`` reads ``val`` when the
            folder has no test split (logged).
        root: the dataset folder (see the module docstring for the layouts).
        classes_file: the classes YAML; default ``ROOT/classes.yaml``.
        num_classes: if given (``data.num_classes``), must equal the number of classes in the file.
        reduce_zero_label: masks store ``1..C`` with 0 = ignore.
        image_dir, mask_dir: folder names under ``root``.
        mask_suffix: masks are named ``<stem><mask_suffix>.<ext>`` (e.g. ``_mask``).
        crop_size: the training crop (``data.crop_size``, an int or ``[height, width]``): after the pre-flight
            check of the ``train`` split, :meth:`check_hint` names a smaller crop when it exceeds every image.
    """

    def __init__(self, split: str = "train", root: str | Path | None = None, transform=None,
                 keep_original_mask: bool = False, skip_bad: bool = False, classes_file: str | Path | None = None,
                 num_classes: int | None = None, reduce_zero_label: bool = False, image_dir: str = "images",
                 mask_dir: str = "masks", mask_suffix: str = "", crop_size: int | Sequence[int] | None = None) -> None:
        super().__init__(transform=transform, keep_original_mask=keep_original_mask, skip_bad=skip_bad)
        layout = (f"{image_dir}/<split>/* and {mask_dir}/<split>/* "
                  f"(or {image_dir}/*, {mask_dir}/* and splits/<split>.txt)")
        base = resolve_root(root, "data=folder", layout, (), image_dir)
        classes_path = Path(classes_file).expanduser() if classes_file else base / "classes.yaml"
        if not classes_path.is_absolute() and classes_file and not classes_path.exists():
            classes_path = base / classes_path
        self.class_names, self.palette = load_classes(classes_path)
        if num_classes is not None and num_classes != len(self.class_names):
            raise SETRConfigError(
                f"data.num_classes: {num_classes} but {classes_path} lists {len(self.class_names)} classes; "
                f"set data.num_classes={len(self.class_names)}")
        self.reduce_zero_label = reduce_zero_label
        self.root = base
        self.split = split
        img_root = base / image_dir
        mask_root = require_dir(base / mask_dir, "data=folder", layout)

        split_list = next((p for p in (base / "splits" / f"{split}.txt", base / f"{split}.txt") if p.is_file()), None)
        if not (img_root / split).is_dir() and split_list is None and split == "test":
            log.info("folder dataset %s: no test split, testing on val", base)
            split = "val"
            split_list = next((p for p in (base / "splits" / "val.txt", base / "val.txt") if p.is_file()), None)
        if (img_root / split).is_dir():
            img_dir, msk_dir = img_root / split, require_dir(mask_root / split, "data=folder", layout)
        elif split_list is not None:
            img_dir, msk_dir = img_root, mask_root
        else:
            raise DataError(f"{img_root / split}: split folder not found, and no split list "
                            f"{base / 'splits' / (split + '.txt')}; expected {layout} ({README_HINT})")
        self.crop_size = None if crop_size is None else size_pair(crop_size, "data.crop_size")
        self.image_dir = img_dir
        self.largest = (0, 0)  # (height, width): the largest of the image sizes read so far (check or loading)
        images, masks = files_by_key(img_dir), files_by_key(msk_dir, suffix=mask_suffix)
        lossy = next((p for p in masks.values() if p.suffix.lower() in (".jpg", ".jpeg")), None)
        if lossy is not None:
            raise DataError(f"{lossy}: JPEG label images are lossy (class ids get blurred at region edges); "
                            "save masks as PNG")
        if split_list is None:
            self.samples = pair_files(images, masks, img_dir, msk_dir, skip_bad, self.skipped)
        else:  # the list names the split's samples (in a flat folder, or narrowing a split folder)
            self.samples = pair_listed(read_split_list(split_list), split_list, images, masks, img_dir, msk_dir,
                                       skip_bad, self.skipped)

    def check_pair(self, image_hw: tuple[int, int], mask_hw: tuple[int, int], img_path, mask_path) -> None:
        """:meth:`SegDataset.check_pair`, noting the largest height and width of the images that pass: the
        pre-flight check calls it with the sizes from the headers it reads, so :meth:`check_hint` costs nothing."""
        super().check_pair(image_hw, mask_hw, img_path, mask_path)
        self.largest = (max(self.largest[0], int(image_hw[0])), max(self.largest[1], int(image_hw[1])))

    def check_hint(self) -> str | None:
        """One hint line after the pre-flight check of the ``train`` split when the crop is larger than every
        image in both sides (the recipe would upsample each image, then pad it to the crop), naming the crop to set:
        the largest side (each side for a ``[height, width]`` crop), rounded down to a multiple of 16 (whole ViT
        patches). None otherwise, with no crop given, and once it was said for this folder and crop."""
        if self.crop_size is None or self.split != "train" or self.largest == (0, 0):
            return None
        (ch, cw), (h, w) = self.crop_size, self.largest
        if ch <= h or cw <= w:
            return None
        if ch == cw:
            new: int | list[int] = max(16, max(h, w) // 16 * 16)
            if new >= ch:
                return None
        else:
            new = [max(16, h // 16 * 16), max(16, w // 16 * 16)]
            if new[0] >= ch and new[1] >= cw:
                return None
        key = (str(self.image_dir.resolve()), self.crop_size)
        if key in _hinted:
            return None
        _hinted.add(key)
        crop = ch if ch == cw else [ch, cw]
        value = str(new).replace(" ", "")
        folder = self.image_dir.relative_to(self.root) if self.image_dir.is_relative_to(self.root) else self.image_dir
        return (f"data.crop_size {crop} is larger than your images (largest {w}x{h} in {folder}): "
                f"set data.crop_size={value} (scales and the slide window follow it)")

    def map_labels(self, raw: np.ndarray, path: str | Path) -> np.ndarray:
        n = self.num_classes
        if self.reduce_zero_label:
            check_raw_values(raw, lambda v: ((v >= 0) & (v <= n)) | (v == IGNORE_INDEX), path,
                             f"reduce_zero_label: 0 ignored, 1..{n} the {n} classes, 255 ignored")
            return reduce_zero_label(raw)
        return self.check_labels(raw, path)
