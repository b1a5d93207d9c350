"""Dataset converters: ``python -m setr.data.convert {cityscapes,pascal_context} ROOT [options]``.

``cityscapes ROOT [--workers N] [--overwrite]``
    Writes ``*_gtFine_labelTrainIds.png`` (19 train ids, 255 ignored) next to every ``*_gtFine_labelIds.png``
    under ``ROOT/gtFine``, with the same table the dataset uses on the fly (so both label paths agree).

``pascal_context ROOT --json trainval_merged.json [--other error|background]``
    Rasterises the official PASCAL-Context Detail-API annotations into ``VOC2010/SegmentationClassContext/<id>.png``
    (0 = background, 1..59 = the 59 classes) and writes ``VOC2010/ImageSets/SegmentationContext/{train,val}.txt``,
    as mmsegmentation's ``tools/dataset_converters/pascal_context.py`` does, but without the ``detail`` package.

JSON format assumed (the Detail API's ``trainval_merged.json``; written from its documentation, so checked
loudly, not trusted):

* ``images``: a list of ``{"image_id", "file_name" ("2008_000002.jpg"), "height", "width", "phase"
  ("train" | "val")}``; images of other phases are left out;
* ``annos_segmentation``: a list of ``{"image_id", "category_id", "segmentation"}`` where ``segmentation`` is a
  COCO RLE (``{"size": [h, w], "counts": "<compressed string>" | [run lengths]}``) or COCO polygons
  (``[[x1, y1, x2, y2, ...], ...]``); masks are painted in file order (a later one wins where two overlap);
  pixels no annotation covers are 0 = background;
* ``categories`` (optional): ``{"category_id", "name"}``; when present, the names of the 59 ids used below are
  compared with the expected class names and differences are reported.

Category ids are those of the 459-category PASCAL-Context label space; the 59 classes are the ids of
:data:`setr.data.palettes.PASCAL_CONTEXT_DETAIL_IDS`, mapped in sorted order to 1..59 (as mmseg's ``_mapping`` /
``np.digitize``). Like mmseg (which asserts), an id outside these 59 stops the conversion with the image and the
id named; ``--other background`` maps such ids to 0 instead (the 60-class benchmark's definition of background).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from setr.data.base import read_mask
from setr.data.cityscapes import LABEL_IDS_SUFFIX, TRAIN_IDS_SUFFIX, label_ids_to_train_ids
from setr.data.layout import resolve_root
from setr.data.palettes import PASCAL_CONTEXT_CLASSES, PASCAL_CONTEXT_DETAIL_IDS
from setr.errors import DataError, SETRConfigError


# ------------------------------------------------------------------------------------------ helpers
def _save_png(array: np.ndarray, path: Path) -> None:
    """Write an 8-bit label PNG atomically (a killed conversion never leaves a half-written label)."""
    tmp = path.with_name(f".{path.name}.tmp")
    Image.fromarray(array.astype(np.uint8), mode="L").save(tmp, format="PNG")
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------------ Cityscapes
def _cityscapes_one(args: tuple[Path, bool]) -> bool:
    src, overwrite = args
    dst = src.with_name(src.name.replace(f"{LABEL_IDS_SUFFIX}.png", f"{TRAIN_IDS_SUFFIX}.png"))
    if dst.exists() and not overwrite:
        return False
    _save_png(label_ids_to_train_ids(read_mask(src), src), dst)
    return True


def convert_cityscapes(root: str | Path, workers: int = 1, overwrite: bool = False) -> tuple[int, int]:
    """Write ``*_gtFine_labelTrainIds.png`` for every ``*_gtFine_labelIds.png``; returns (written, kept)."""
    base = resolve_root(root, "Cityscapes", "gtFine/<split>/<city>/*_gtFine_labelIds.png", ("cityscapes",),
                        "gtFine")
    sources = sorted((base / "gtFine").rglob(f"*{LABEL_IDS_SUFFIX}.png"))
    if not sources:
        raise DataError(f"{base / 'gtFine'}: no *{LABEL_IDS_SUFFIX}.png files to convert")
    jobs = [(p, overwrite) for p in sources]
    if workers > 1:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            done = list(pool.map(_cityscapes_one, jobs, chunksize=32))
    else:
        done = [_cityscapes_one(j) for j in jobs]
    return sum(done), len(done) - sum(done)


# ------------------------------------------------------------------------------------------ COCO RLE
def rle_string_to_counts(s: str | bytes) -> list[int]:
    """Decode COCO's compressed RLE string (6-bit chars from '0', 5 payload bits + continuation bit; from the
    fourth run on, each value is stored as the difference to the run two places before)."""
    if isinstance(s, bytes):
        s = s.decode("ascii")
    counts: list[int] = []
    p = 0
    while p < len(s):
        x, k, more = 0, 0, True
        while more:
            if p >= len(s):
                raise ValueError("truncated RLE string")
            c = ord(s[p]) - 48
            if not 0 <= c < 64:
                raise ValueError(f"character {s[p]!r} is not part of a COCO RLE string")
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p += 1
            k += 1
            if not more and c & 0x10:
                x -= 1 << (5 * k)  # sign-extend
        if len(counts) > 2:
            x += counts[-2]
        counts.append(x)
    return counts


def counts_to_rle_string(counts: Sequence[int]) -> str:
    """Encode run lengths as COCO's compressed RLE string (the inverse of :func:`rle_string_to_counts`)."""
    out = []
    for i, n in enumerate(counts):
        x = int(n) - (int(counts[i - 2]) if i > 2 else 0)
        more = True
        while more:
            c = x & 0x1F
            x >>= 5
            more = x != -1 if c & 0x10 else x != 0
            if more:
                c |= 0x20
            out.append(chr(c + 48))
    return "".join(out)


def rle_counts_to_mask(counts: Sequence[int], h: int, w: int) -> np.ndarray:
    """Run lengths (starting with a run of zeros, column-major as COCO) -> boolean ``(h, w)`` mask."""
    counts = np.asarray(counts, dtype=np.int64)
    if (counts < 0).any() or counts.sum() != h * w:
        raise ValueError(f"run lengths cover {int(counts.sum())} pixels, the mask has {h}x{w}={h * w}")
    flat = np.repeat((np.arange(len(counts)) % 2).astype(bool), counts)
    return flat.reshape(w, h).T


def mask_to_rle_counts(mask: np.ndarray) -> list[int]:
    """Boolean ``(h, w)`` mask -> COCO run lengths (column-major, first run = zeros)."""
    flat = np.asarray(mask, dtype=bool).T.reshape(-1)
    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    runs = np.diff(bounds).tolist()
    return [0, *runs] if flat.size and flat[0] else runs


def decode_segmentation(seg: Any, h: int, w: int) -> np.ndarray:
    """A COCO-style segmentation (compressed / uncompressed RLE, or polygons) as a boolean ``(h, w)`` mask."""
    if isinstance(seg, dict):
        size = seg.get("size")
        if size is not None and [int(v) for v in size] != [h, w]:
            raise ValueError(f"RLE size {list(size)} differs from the image size [{h}, {w}]")
        counts = seg.get("counts")
        if isinstance(counts, (str, bytes)):
            counts = rle_string_to_counts(counts)
        if not isinstance(counts, list):
            raise ValueError("RLE 'counts' must be a string or a list of run lengths")
        return rle_counts_to_mask(counts, h, w)
    if isinstance(seg, list):
        canvas = Image.new("L", (w, h), 0)
        draw = ImageDraw.Draw(canvas)
        for poly in seg:
            if not isinstance(poly, list) or len(poly) < 6 or len(poly) % 2:
                raise ValueError("a polygon must be a flat list [x1, y1, x2, y2, ...] of at least 3 points")
            draw.polygon([(float(poly[i]), float(poly[i + 1])) for i in range(0, len(poly), 2)], fill=1)
        return np.asarray(canvas, dtype=bool)
    raise ValueError(f"unknown segmentation format {type(seg).__name__}; expected an RLE dict or polygons")


# ------------------------------------------------------------------------------------------ Pascal Context
_DETAIL_KEYS = np.asarray((0, *PASCAL_CONTEXT_DETAIL_IDS), dtype=np.int64)  # sorted; index = class (0..59)


def detail_ids_to_classes(ids: np.ndarray, where: str, other: str = "error") -> np.ndarray:
    """Detail category ids (0 = background) -> 0..59. Ids outside the 59 classes raise (``other="error"``) or
    become background (``other="background"``)."""
    pos = np.clip(np.searchsorted(_DETAIL_KEYS, ids), 0, len(_DETAIL_KEYS) - 1)
    known = _DETAIL_KEYS[pos] == ids
    if not known.all():
        if other != "background":
            bad = sorted(int(v) for v in np.unique(ids[~known]))[:5]
            raise DataError(f"{where}: category ids {bad} are not among the 59 PASCAL-Context classes "
                            "(pass --other background to map them to background)")
        pos = np.where(known, pos, 0)
    return pos.astype(np.uint8)


def _check_category_names(categories: Any, json_path: Path) -> list[str]:
    """Compare the JSON's names for the 59 ids with ours; return the differences (reported, not fatal)."""
    if not isinstance(categories, list):
        return []
    names = {}
    for c in categories:
        if isinstance(c, dict) and "category_id" in c and "name" in c:
            names[int(c["category_id"])] = str(c["name"])

    def norm(s: str) -> str:
        return "".join(ch for ch in s.lower() if ch.isalnum())

    diffs = []
    for cid, ours in zip(PASCAL_CONTEXT_DETAIL_IDS, PASCAL_CONTEXT_CLASSES[1:]):
        theirs = names.get(cid)
        if theirs is not None and norm(theirs) != norm(ours):
            diffs.append(f"id {cid}: {theirs!r} (expected {ours!r})")
    return diffs


def convert_pascal_context(root: str | Path, json_path: str | Path, other: str = "error") -> dict[str, int]:
    """Write SegmentationClassContext PNGs and the train/val lists from Detail-API JSON; returns images per
    phase."""
    if other not in ("error", "background"):
        raise SETRConfigError(f"--other: {other!r}; use error or background")
    layout = "VOC2010/JPEGImages (or VOCdevkit/VOC2010/JPEGImages)"
    base = resolve_root(root, "Pascal Context", layout, ("VOC2010", "VOCdevkit/VOC2010"), "JPEGImages")
    json_path = Path(json_path).expanduser()
    if not json_path.is_file():
        for cand in (Path(root) / json_path, base / json_path.name, base.parent / json_path.name):
            if cand.is_file():
                json_path = cand
                break
        else:
            raise DataError(f"{json_path}: annotation file not found (download trainval_merged.json, see "
                            "data/README.md)")
    try:
        doc = json.loads(json_path.read_text())
    except (OSError, ValueError) as e:
        raise DataError(f"{json_path}: cannot read the annotation JSON ({str(e).splitlines()[0]})") from e
    if not isinstance(doc, dict) or not isinstance(doc.get("images"), list) or not isinstance(
            doc.get("annos_segmentation"), list):
        raise DataError(f"{json_path}: expected the Detail-API format with lists 'images' and "
                        "'annos_segmentation' (see setr/data/convert.py)")
    for diff in _check_category_names(doc.get("categories"), json_path):
        print(f"warning: {json_path}: category {diff}", file=sys.stderr)

    annos: dict[Any, list[dict]] = {}
    for a in doc["annos_segmentation"]:
        if not isinstance(a, dict) or not {"image_id", "category_id", "segmentation"} <= set(a):
            raise DataError(f"{json_path}: an annos_segmentation entry lacks image_id, category_id or "
                            f"segmentation: {str(a)[:80]}")
        annos.setdefault(a["image_id"], []).append(a)

    out_dir = base / "SegmentationClassContext"
    list_dir = base / "ImageSets" / "SegmentationContext"
    out_dir.mkdir(parents=True, exist_ok=True)
    list_dir.mkdir(parents=True, exist_ok=True)
    phases: dict[str, list[str]] = {"train": [], "val": []}
    for img in doc["images"]:
        try:
            phase = img.get("phase", img.get("split"))
            image_id, file_name = img["image_id"], str(img["file_name"])
            h, w = int(img["height"]), int(img["width"])
        except (AttributeError, KeyError, TypeError, ValueError) as e:
            raise DataError(f"{json_path}: an image entry lacks image_id, file_name, height or width: "
                            f"{str(img)[:80]}") from e
        if phase not in phases:
            continue
        where = f"{json_path} ({file_name})"
        ids = np.zeros((h, w), dtype=np.int64)
        for a in annos.get(image_id, []):
            try:
                ids[decode_segmentation(a["segmentation"], h, w)] = int(a["category_id"])
            except ValueError as e:
                raise DataError(f"{where}: bad segmentation of category {a['category_id']} ({e})") from e
        stem = Path(file_name).stem
        _save_png(detail_ids_to_classes(ids, where, other), out_dir / f"{stem}.png")
        phases[phase].append(stem)
    if not any(phases.values()):
        raise DataError(f"{json_path}: no image with phase 'train' or 'val'")
    for phase, stems in phases.items():
        (list_dir / f"{phase}.txt").write_text("".join(f"{s}\n" for s in sorted(stems)))
    return {k: len(v) for k, v in phases.items()}


# ------------------------------------------------------------------------------------------ CLI
def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m setr.data.convert",
                                     description="Convert downloaded dataset labels to the files SETR reads.")
    sub = parser.add_subparsers(dest="dataset", required=True)
    cs = sub.add_parser("cityscapes", help="write *_gtFine_labelTrainIds.png from *_gtFine_labelIds.png")
    cs.add_argument("root", help="the Cityscapes folder (holding leftImg8bit/ and gtFine/)")
    cs.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="processes (default: CPUs, max 8)")
    cs.add_argument("--overwrite", action="store_true", help="rewrite existing *_labelTrainIds.png files")
    pc = sub.add_parser("pascal_context", help="Detail-API JSON -> SegmentationClassContext PNGs + split lists")
    pc.add_argument("root", help="VOC2010, or a folder holding VOC2010 or VOCdevkit/VOC2010")
    pc.add_argument("--json", required=True, help="trainval_merged.json (a path, or a name inside ROOT)")
    pc.add_argument("--other", choices=("error", "background"), default="error",
                    help="category ids outside the 59 classes: stop (default, as mmseg) or map to background")
    args = parser.parse_args(argv)
    try:
        if args.dataset == "cityscapes":
            written, kept = convert_cityscapes(args.root, workers=max(1, args.workers), overwrite=args.overwrite)
            print(f"cityscapes: wrote {written} *{TRAIN_IDS_SUFFIX}.png files"
                  + (f", kept {kept} existing (--overwrite to redo)" if kept else ""))
        else:
            counts = convert_pascal_context(args.root, args.json, other=args.other)
            print("pascal_context: wrote " + ", ".join(f"{n} {k}" for k, n in counts.items()) + " label images")
    except SETRConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
