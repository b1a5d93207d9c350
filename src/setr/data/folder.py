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

The layout helpers here (:func:`resolve_root`, :func:`require_dir`, :func:`files_by_key`, :func:`pair_files`)
are shared by the ADE20K, Cityscapes and Pascal Context datasets.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np
import yaml

from setr.data.base import IGNORE_INDEX, SegDataset, default_palette
from setr.data.registry import register_dataset
from setr.errors import DataError, SETRConfigError

log = logging.getLogger("setr")

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".ppm")
README_HINT = "see data/README.md"


# ------------------------------------------------------------------------------------------ layout helpers
def resolve_root(root: str | Path | None, dataset: str, layout: str, candidates: Sequence[str],
                 marker: str) -> Path:
    """The folder under ``root`` (``root`` itself or one of the relative ``candidates``) that contains
    ``marker``; a missing root, or one without the expected layout, raises one line naming the path."""
    if root is None:
        raise DataError(f"data.root: not set; {dataset} expects {layout} under it ({README_HINT})")
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"{root}: dataset root not found; {dataset} expects {layout} under it ({README_HINT})")
    for sub in ("", *candidates):
        base = root / sub if sub else root
        if (base / marker).exists():
            return base
    tried = ", ".join(str(root / c / marker) if c else str(root / marker) for c in ("", *candidates))
    raise DataError(f"{root}: no {dataset} layout found (looked for {tried}); expected {layout} ({README_HINT})")


def require_dir(path: Path, dataset: str, layout: str, hint: str = README_HINT) -> Path:
    if not path.is_dir():
        raise DataError(f"{path}: folder not found; {dataset} expects {layout} ({hint})")
    return path


def files_by_key(folder: Path, suffix: str = "", exts: Iterable[str] = IMAGE_EXTS, recursive: bool = False,
                 ) -> dict[str, Path]:
    """Files of ``folder`` whose name ends with ``suffix`` + one of ``exts``, keyed by their path relative to
    ``folder`` without that ending (``city/name`` for Cityscapes). Two files with one key raise."""
    exts = tuple(e.lower() for e in exts)
    out: dict[str, Path] = {}
    paths = folder.rglob("*") if recursive else folder.iterdir()
    for p in sorted(paths):
        if p.name.startswith(".") or not p.is_file():
            continue
        ext = p.suffix.lower()
        if ext not in exts or not p.stem.endswith(suffix):
            continue
        rel = p.relative_to(folder).with_suffix("").as_posix()
        key = rel[: len(rel) - len(suffix)] if suffix else rel
        if key in out:
            raise DataError(f"{p}: two files share the name {key!r} ({out[key].name} and {p.name}); keep one")
        out[key] = p
    return out


def pair_files(images: dict[str, Path], masks: dict[str, Path], img_dir: Path, mask_dir: Path,
               skip_bad: bool, skipped: list[str]) -> list[tuple[Path, Path]]:
    """Pair images and masks by key. Unmatched files raise one line naming both folders and the first
    unmatched name; with ``skip_bad`` they are left out and recorded in ``skipped``."""
    no_mask = sorted(set(images) - set(masks))
    no_image = sorted(set(masks) - set(images))
    if (no_mask or no_image) and not skip_bad:
        if no_mask:
            first = images[no_mask[0]]
            what = f"no label file for {first.name}" + (f" (+{len(no_mask) - 1} more)" if len(no_mask) > 1 else "")
        else:
            first = masks[no_image[0]]
            what = f"no image for label {first.name}" + (f" (+{len(no_image) - 1} more)" if len(no_image) > 1 else "")
        raise DataError(
            f"{mask_dir}: {len(images)} images in {img_dir} but {len(masks)} label files; {what} "
            "(set data.skip_bad=true to skip unmatched files)"
        )
    skipped += [f"{images[k]}: no label file in {mask_dir}" for k in no_mask]
    skipped += [f"{masks[k]}: no image in {img_dir}" for k in no_image]
    return [(images[k], masks[k]) for k in sorted(set(images) & set(masks))]


def read_split_list(path: Path) -> list[str]:
    """Stems listed one a line (blank lines and ``#`` comments skipped; a file extension is dropped)."""
    try:
        lines = path.read_text().splitlines()
    except OSError as e:
        raise DataError(f"{path}: cannot read the split list ({e.strerror or e})") from e
    out = []
    for line in lines:
        line = line.split("#", 1)[0].strip()
        if line:
            stem = Path(line).stem if Path(line).suffix.lower() in IMAGE_EXTS else line
            out.append(stem)
    return out


def check_raw_values(raw: np.ndarray, allowed: Callable[[np.ndarray], np.ndarray], path: str | Path,
                     what: str) -> None:
    """Raise one line naming ``path`` when some raw label values are not ``allowed`` (a boolean function)."""
    bad = ~allowed(raw)
    if bad.any():
        values = sorted(int(v) for v in np.unique(raw[bad]))
        shown = ", ".join(map(str, values[:5])) + (", ..." if len(values) > 5 else "")
        raise DataError(f"{path}: label values [{shown}] are not valid ({what})")


def reduce_zero_label(raw: np.ndarray) -> np.ndarray:
    """0 -> 255 (ignored), ``v -> v - 1`` for the others, 255 stays 255 (mmseg ``reduce_zero_label``)."""
    out = raw.astype(np.int64) - 1
    out[raw == 0] = IGNORE_INDEX
    out[raw == IGNORE_INDEX] = IGNORE_INDEX
    return out


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
    """

    def __init__(self, split: str = "train", root: str | Path | None = None, transform=None,
                 keep_original_mask: bool = False, skip_bad: bool = False, classes_file: str | Path | None = None,
                 num_classes: int | None = None, reduce_zero_label: bool = False, image_dir: str = "images",
                 mask_dir: str = "masks", mask_suffix: str = "") -> None:
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
            images = files_by_key(img_dir)
            masks = files_by_key(msk_dir, suffix=mask_suffix)
            if split_list is not None:  # a list can still narrow a split folder
                keep = set(read_split_list(split_list))
                images = {k: v for k, v in images.items() if k in keep}
                masks = {k: v for k, v in masks.items() if k in keep}
        elif split_list is not None:
            img_dir, msk_dir = img_root, mask_root
            stems = read_split_list(split_list)
            all_images, all_masks = files_by_key(img_dir), files_by_key(msk_dir, suffix=mask_suffix)
            missing = [s for s in stems if s not in all_images]
            if missing and not skip_bad:
                raise DataError(f"{split_list}: lists {missing[0]!r} but {img_dir} has no such image"
                                + (f" (+{len(missing) - 1} more)" if len(missing) > 1 else ""))
            self.skipped += [f"{split_list}: {s}: image not found in {img_dir}" for s in missing]
            images = {s: all_images[s] for s in stems if s in all_images}
            masks = {s: all_masks[s] for s in stems if s in all_masks}
        else:
            raise DataError(f"{img_root / split}: split folder not found, and no split list "
                            f"{base / 'splits' / (split + '.txt')}; expected {layout} ({README_HINT})")
        lossy = next((p for p in masks.values() if p.suffix.lower() in (".jpg", ".jpeg")), None)
        if lossy is not None:
            raise DataError(f"{lossy}: JPEG label images are lossy (class ids get blurred at region edges); "
                            "save masks as PNG")
        self.samples = pair_files(images, masks, img_dir, msk_dir, skip_bad, self.skipped)

    def map_labels(self, raw: np.ndarray, path: str | Path) -> np.ndarray:
        n = self.num_classes
        if self.reduce_zero_label:
            check_raw_values(raw, lambda v: ((v >= 0) & (v <= n)) | (v == IGNORE_INDEX), path,
                             f"reduce_zero_label: 0 ignored, 1..{n} the {n} classes, 255 ignored")
            return reduce_zero_label(raw)
        return self.check_labels(raw, path)


register_dataset("folder", FolderDataset)
