"""Tiny fake copies of the real dataset layouts (a few 40x56 images), for tests and smoke training runs.

Each ``make_*`` writes a tree under ``root`` and returns the folder to pass as ``data.root``. Images show every
labelled region in its own flat colour (plus a little noise), so a model can learn them and a test can check
that image and mask stay aligned. ``expected_*`` give the labels the datasets must return (class ids 0..C-1,
255 ignored) for one sample, computed here independently of the dataset code.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

H, W = 40, 56

# raw values written into the label files, per dataset (chosen to hit the edges of every mapping)
ADE_RAW = (0, 1, 5, 150)                   # 0 = unlabelled (-> 255), k -> k - 1
CITYSCAPES_RAW = (0, 4, 7, 26, 33, 11)      # unlabeled, static (ignored), road, car, bicycle, building
CITYSCAPES_TRAIN = {0: 255, 4: 255, 7: 0, 26: 13, 33: 18, 11: 2, 255: 255}
PASCAL_CLASSES = (0, 1, 15, 59)             # background, aeroplane, cat, wood (60-class ids)
PASCAL_DETAIL = {0: 0, 1: 2, 15: 65, 59: 458}   # 60-class id -> Detail category id
FOLDER_CLASSES = ("background", "road", "car")


def _layout(values: tuple[int, ...], seed: int, h: int = H, w: int = W) -> np.ndarray:
    """A label map of ``values``: the first fills the frame, the others are rectangles / a disc."""
    rng = np.random.default_rng(seed)
    lab = np.full((h, w), values[0], dtype=np.int64)
    yy, xx = np.mgrid[:h, :w]
    for k, v in enumerate(values[1:]):
        if k % 3 == 2:
            cy, cx, r = rng.integers(h // 4, 3 * h // 4), rng.integers(w // 4, 3 * w // 4), rng.integers(5, h // 3)
            lab[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = v
        else:
            y0, x0 = rng.integers(0, h // 2), rng.integers(0, w // 2)
            lab[y0 : y0 + rng.integers(8, h // 2 + 1), x0 : x0 + rng.integers(8, w // 2 + 1)] = v
    return lab


def _image(lab: np.ndarray, seed: int) -> np.ndarray:
    """Each label value in a fixed flat colour plus mild noise (uint8 RGB)."""
    rng = np.random.default_rng(seed + 1000)
    colours = {int(v): np.random.default_rng(int(v) + 17).integers(30, 226, 3) for v in np.unique(lab)}
    img = np.zeros((*lab.shape, 3), dtype=np.float64)
    for v, c in colours.items():
        img[lab == v] = c
    img += rng.normal(0, 4, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def _save(array: np.ndarray, path: Path, **kw) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = "RGB" if array.ndim == 3 else "L"
    Image.fromarray(array.astype(np.uint8), mode=mode).save(path, **kw)


# ------------------------------------------------------------------------------------------ ADE20K
def ade_raw(split: str, i: int) -> np.ndarray:
    return _layout(ADE_RAW, seed=(0 if split == "training" else 100) + i)


def expected_ade20k(split: str, i: int) -> np.ndarray:
    raw = ade_raw(split, i)
    return np.where(raw == 0, 255, raw - 1)


def make_ade20k(root: str | Path, n_train: int = 4, n_val: int = 2) -> Path:
    """``root/ADEChallengeData2016/{images,annotations}/{training,validation}``; returns ``root``."""
    root = Path(root)
    base = root / "ADEChallengeData2016"
    for split, n in (("training", n_train), ("validation", n_val)):
        tag = "train" if split == "training" else "val"
        for i in range(n):
            raw = ade_raw(split, i)
            name = f"ADE_{tag}_{i + 1:08d}"
            _save(_image(raw, i), base / "images" / split / f"{name}.jpg", quality=95)
            _save(raw, base / "annotations" / split / f"{name}.png")
    return root


# ------------------------------------------------------------------------------------------ Cityscapes
CITIES = {"train": ("aachen", "bremen"), "val": ("frankfurt",)}


def cityscapes_names(split: str, n: int) -> list[tuple[str, str]]:
    cities = CITIES[split]
    return [(cities[i % len(cities)], f"{cities[i % len(cities)]}_{i:06d}_000019") for i in range(n)]


def cityscapes_raw(split: str, i: int) -> np.ndarray:
    raw = _layout(CITYSCAPES_RAW, seed=(0 if split == "train" else 100) + i)
    raw[0, :3] = 255  # a stray 255 (what a -1 license plate becomes in 8 bits): ignored
    return raw


def expected_cityscapes(split: str, i: int) -> np.ndarray:
    raw = cityscapes_raw(split, i)
    return np.vectorize(CITYSCAPES_TRAIN.__getitem__)(raw)


def make_cityscapes(root: str | Path, n_train: int = 4, n_val: int = 2, train_ids: bool = False) -> Path:
    """``root/leftImg8bit/<split>/<city>/*_leftImg8bit.png`` + ``root/gtFine/.../*_gtFine_labelIds.png``
    (and ``*_gtFine_labelTrainIds.png`` with ``train_ids=True``, computed here); returns ``root``."""
    root = Path(root)
    for split, n in (("train", n_train), ("val", n_val)):
        for i, (city, name) in enumerate(cityscapes_names(split, n)):
            raw = cityscapes_raw(split, i)
            _save(_image(raw, i), root / "leftImg8bit" / split / city / f"{name}_leftImg8bit.png")
            gt = root / "gtFine" / split / city
            _save(raw, gt / f"{name}_gtFine_labelIds.png")
            _save(np.zeros((H, W, 3), np.uint8), gt / f"{name}_gtFine_color.png")  # present in the real zip
            if train_ids:
                _save(expected_cityscapes(split, i), gt / f"{name}_gtFine_labelTrainIds.png")
    return root


# ------------------------------------------------------------------------------------------ Pascal Context
def pascal_names(split: str, n: int) -> list[str]:
    year = 2008 if split == "train" else 2009
    return [f"{year}_{i:06d}" for i in range(1, n + 1)]


def expected_pascal_context(split: str, i: int) -> np.ndarray:
    """The 60-class labels (0 = background) of sample ``i``."""
    return _layout(PASCAL_CLASSES, seed=(0 if split == "train" else 100) + i)


def _runs(mask: np.ndarray) -> list[int]:
    """COCO run lengths of a boolean mask (column-major, first run = zeros), written independently of
    setr.data.convert."""
    runs, cur, n = [], False, 0
    for v in mask.T.reshape(-1):
        if bool(v) == cur:
            n += 1
        else:
            runs.append(n)
            cur, n = bool(v), 1
    runs.append(n)
    return runs


def _rle_string(mask: np.ndarray) -> str:
    """COCO compressed RLE string of a boolean mask."""
    runs = _runs(mask)
    chars = []
    for i, r in enumerate(runs):
        x = r - (runs[i - 2] if i > 2 else 0)
        while True:
            c, x = x & 31, x >> 5
            more = x != -1 if c & 16 else x != 0
            chars.append(chr((c | 32 if more else c) + 48))
            if not more:
                break
    return "".join(chars)


POLYGON_STEM = "2010_000001"  # the extra train image annotated with a polygon


def expected_pascal_polygon() -> np.ndarray:
    """Labels of :data:`POLYGON_STEM`: a 26x11 "cat" (class 15) rectangle; PIL fills polygon borders."""
    lab = np.zeros((H, W), np.int64)
    lab[10:21, 5:31] = 15
    return lab


def make_pascal_context(root: str | Path, n_train: int = 4, n_val: int = 2, convert: bool = True) -> Path:
    """``root/VOCdevkit/VOC2010/JPEGImages/*.jpg`` and ``root/trainval_merged.json`` (Detail-API format: one
    RLE annotation per class and image -- compressed strings, uncompressed run lengths for the last val image --
    and one more train image, :data:`POLYGON_STEM`, whose only object is a polygon); with ``convert`` the label
    PNGs and split lists are made with ``setr.data.convert``. Returns ``root``."""
    root = Path(root)
    voc = root / "VOCdevkit" / "VOC2010"
    images, annos = [], []
    for split, n in (("train", n_train), ("val", n_val)):
        for i, stem in enumerate(pascal_names(split, n)):
            lab = expected_pascal_context(split, i)
            _save(_image(lab, i), voc / "JPEGImages" / f"{stem}.jpg", quality=95)
            image_id = int(stem.replace("_", ""))
            images.append({"image_id": image_id, "file_name": f"{stem}.jpg", "height": H, "width": W,
                           "phase": split, "date_captured": "", "annotations": [], "categories": []})
            for cls in PASCAL_CLASSES[1:]:
                m = lab == cls
                if not m.any():
                    continue
                last_val = split == "val" and i == n - 1
                # compressed RLE strings, except the last val image: uncompressed run lengths
                seg = {"size": [H, W], "counts": _runs(m) if last_val else _rle_string(m)}
                annos.append({"id": len(annos) + 1, "image_id": image_id, "category_id": PASCAL_DETAIL[cls],
                              "segmentation": seg, "area": int(m.sum()), "parts": []})
                images[-1]["annotations"].append(len(annos))
    # a polygon: an extra train image whose only object is an axis-aligned rectangle of "cat"
    _save(_image(expected_pascal_polygon(), 7), voc / "JPEGImages" / f"{POLYGON_STEM}.jpg", quality=95)
    images.append({"image_id": 2010000001, "file_name": f"{POLYGON_STEM}.jpg", "height": H, "width": W,
                   "phase": "train"})
    annos.append({"id": len(annos) + 1, "image_id": 2010000001, "category_id": 65,
                  "segmentation": [[5, 10, 30, 10, 30, 20, 5, 20]]})
    # an image of another phase: must be left out
    images.append({"image_id": 2010000002, "file_name": "2010_000002.jpg", "height": H, "width": W,
                   "phase": "test"})
    categories = [{"category_id": 2, "name": "aeroplane"}, {"category_id": 65, "name": "cat"},
                  {"category_id": 458, "name": "wood"}, {"category_id": 7, "name": "some other thing"}]
    doc = {"info": {"description": "fake PASCAL in Detail"}, "images": images, "annos_segmentation": annos,
           "categories": categories, "parts": [], "annos_joints": []}
    root.mkdir(parents=True, exist_ok=True)
    (root / "trainval_merged.json").write_text(json.dumps(doc))
    if convert:
        from setr.data.convert import convert_pascal_context

        convert_pascal_context(root, root / "trainval_merged.json")
    return root


# ------------------------------------------------------------------------------------------ folder
def folder_raw(split: str, i: int, size: tuple[int, int] = (H, W)) -> np.ndarray:
    raw = _layout((0, 1, 2), seed=(0 if split == "train" else 100) + i, h=size[0], w=size[1])
    raw[-1, -4:] = 255
    return raw


def make_folder(root: str | Path, n_train: int = 4, n_val: int = 2, layout: str = "split_dirs",
                size: tuple[int, int] = (H, W)) -> Path:
    """``root/images/<split>/*.png`` + ``root/masks/<split>/*.png`` (``layout="split_dirs"``) or flat
    ``images/``, ``masks/`` with ``splits/<split>.txt`` (``layout="lists"``), plus ``classes.yaml`` with 3
    classes; images are ``size`` = (height, width) pixels. Returns ``root``."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    (root / "classes.yaml").write_text(
        "classes:\n  - {name: background, color: [0, 0, 0]}\n  - {name: road, color: [128, 64, 128]}\n"
        "  - car\n")
    for split, n in (("train", n_train), ("val", n_val)):
        stems = [f"{split}_{i:03d}" for i in range(n)]
        for i, stem in enumerate(stems):
            raw = folder_raw(split, i, size)
            sub = split if layout == "split_dirs" else ""
            _save(_image(raw, i), root / "images" / sub / f"{stem}.png")
            _save(raw, root / "masks" / sub / f"{stem}.png")
        if layout == "lists":
            (root / "splits").mkdir(exist_ok=True)
            (root / "splits" / f"{split}.txt").write_text("".join(f"{s}\n" for s in stems))
    return root


# ------------------------------------------------------------------------------------------ damage
def truncate(path: str | Path) -> Path:
    """Cut the second half of a file: the header still opens (size and mode readable without decoding), the
    pixel data ends early, so only decoding the pixels fails -- what an interrupted copy or download leaves."""
    path = Path(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path
