"""Finding a dataset's files on disk: the one place that resolves roots, lists folders, reads split lists and
pairs images with labels, for every file-based dataset (ADE20K, Cityscapes, Pascal Context, folder) and the
converters.

Each helper raises one :class:`setr.errors.DataError` line naming the path and what was expected (with a
pointer to ``data/README.md``), so a dataset that is missing or laid out differently is reported before any
file is read. With ``skip_bad`` the pairing helpers leave unmatched files out and record them in the dataset's
``skipped`` list instead.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from setr.errors import DataError, SETRConfigError

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".ppm")
README_HINT = "see data/README.md"


def split_folder(split: str, splits: Mapping[str, str], dataset: str) -> str:
    """The folder (or split list) that ``split`` reads, from the dataset's ``splits`` table (``test`` reads the
    validation data where the test labels are not public); an unknown split raises one line."""
    if split not in splits:
        raise SETRConfigError(f"data.split: unknown {dataset} split {split!r}; use {', '.join(splits)}")
    return splits[split]


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
    """``path`` if it is a folder, else one line naming it and the layout the dataset expects."""
    if not path.is_dir():
        raise DataError(f"{path}: folder not found; {dataset} expects {layout} ({hint})")
    return path


def files_by_key(folder: Path, suffix: str = "", exts: Iterable[str] = IMAGE_EXTS, recursive: bool = False,
                 ) -> dict[str, Path]:
    """Files of ``folder`` whose name ends with ``suffix`` + one of ``exts``, keyed by their path relative to
    ``folder`` without that ending (``city/name`` for Cityscapes), so images and labels of one sample get one
    key whatever their extensions. Two files with one key raise: which one is meant cannot be guessed."""
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


def _more(n: int) -> str:
    return f" (+{n} more)" if n > 0 else ""


def pair_files(images: Mapping[str, Path], masks: Mapping[str, Path], img_dir: Path, mask_dir: Path,
               skip_bad: bool, skipped: list[str], wanted: str = "label file") -> list[tuple[Path, Path]]:
    """Pair images and masks by key, in key order. Unmatched files raise one line naming both folders, the
    counts and the first unmatched file (relative to its folder; ``wanted`` says what its partner would be);
    with ``skip_bad`` they are left out and recorded in ``skipped``."""
    no_mask = sorted(set(images) - set(masks))
    no_image = sorted(set(masks) - set(images))
    if (no_mask or no_image) and not skip_bad:
        if no_mask:
            what = f"no {wanted} for {images[no_mask[0]].relative_to(img_dir).as_posix()}"
        else:
            what = f"no image for label {masks[no_image[0]].relative_to(mask_dir).as_posix()}"
        raise DataError(f"{mask_dir}: {len(images)} images in {img_dir} but {len(masks)} label files; {what}"
                        f"{_more(len(no_mask) + len(no_image) - 1)} (set data.skip_bad=true to skip unmatched files)")
    skipped += [f"{images[k]}: no {wanted} in {mask_dir}" for k in no_mask]
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


def pair_listed(stems: Sequence[str], list_path: Path, images: Mapping[str, Path], masks: Mapping[str, Path],
                img_dir: Path, mask_dir: Path, skip_bad: bool, skipped: list[str]) -> list[tuple[Path, Path]]:
    """:func:`pair_files` for the samples a split list (``list_path``, read into ``stems``) names. A listed stem
    without an image in ``img_dir`` raises one line naming the list, the stem and the folder; with ``skip_bad``
    it is recorded in ``skipped``. Files the list does not name are not part of the split."""
    missing = [s for s in stems if s not in images]
    if missing and not skip_bad:
        raise DataError(f"{list_path}: lists {missing[0]!r} but {img_dir} has no such image{_more(len(missing) - 1)}"
                        " (set data.skip_bad=true to skip missing files)")
    skipped += [f"{list_path}: {s}: image not found in {img_dir}" for s in missing]
    listed = {s: images[s] for s in stems if s in images}
    return pair_files(listed, {s: masks[s] for s in listed if s in masks}, img_dir, mask_dir, skip_bad, skipped)
