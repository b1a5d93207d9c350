"""Run a trained checkpoint on image files: the logic behind ``src/predict.py``.

For each input ``<stem>.<ext>`` it writes into the output folder:

* ``<stem>_label.png``: a mode "P" PNG whose pixel values are the class ids, with the checkpoint's palette;
* ``<stem>_overlay.png``: the image blended with the class colours (``alpha`` of colour);
* ``<stem>_side.png`` (``side_by_side=true``): the image and the coloured prediction side by side.

Inputs of two files with the same stem get ``<stem>_<ext>`` (then ``-2``, ``-3``...) instead, so none is
overwritten. The model runs at each image's own size; ``batch_size`` images of the same size go through one
forward. :func:`colorize`, :func:`overlay` and :func:`predict_image` work on plain arrays, for notebooks.
"""

from __future__ import annotations

import glob
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from setr.data.base import default_palette, read_image
from setr.errors import DataError, SETRConfigError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm")
INFERENCE_KEYS = ("mode", "crop_size", "stride", "batch_size", "scales", "flip")


# ------------------------------------------------------------------------------------------- inputs
def is_image_file(path: str | Path) -> bool:
    """True when ``path`` ends in one of :data:`IMAGE_SUFFIXES` (case-insensitive)."""
    return Path(path).suffix.lower() in IMAGE_SUFFIXES


def collect_inputs(spec: str | Path) -> list[Path]:
    """The files named by ``spec``, sorted: one file (any extension), the image files directly inside a folder
    (not its subfolders), or the image files matching a glob pattern (``**`` recurses).

    Raises :class:`SETRConfigError` naming ``spec`` when nothing matches.
    """
    text = str(spec).strip()
    if not text:
        raise SETRConfigError("input: empty; pass an image file, a folder or a glob pattern")
    path = Path(text).expanduser()
    if path.is_file():
        return [path]
    kinds = ", ".join(IMAGE_SUFFIXES)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and is_image_file(p))
        if not files:
            raise SETRConfigError(f"input: folder {path} holds no image files ({kinds}; subfolders are not searched)")
        return files
    if any(c in text for c in "*?["):
        matches = glob.glob(os.path.expanduser(text), recursive=True)
        files = sorted(Path(p) for p in matches if Path(p).is_file() and is_image_file(p))
        if not files:
            raise SETRConfigError(f"input: no image files match {text!r}")
        return files
    raise SETRConfigError(f"input: {text} not found (expected an image file, a folder or a glob pattern)")


def output_stems(paths: Sequence[Path]) -> list[str]:
    """One output stem per path: the file's stem; ``<stem>_<ext>`` (then ``-2``, ``-3``...) where stems collide."""
    counts: dict[str, int] = {}
    for p in paths:
        counts[p.stem] = counts.get(p.stem, 0) + 1
    used: set[str] = set()
    stems = []
    for p in paths:
        stem = p.stem if counts[p.stem] == 1 else f"{p.stem}_{p.suffix.lstrip('.').lower() or 'noext'}"
        base, n = stem, 2
        while stem in used:
            stem, n = f"{base}-{n}", n + 1
        used.add(stem)
        stems.append(stem)
    return stems


# ---------------------------------------------------------------------------------------- drawing
def _palette_rgb(palette: Sequence[Sequence[int]]) -> np.ndarray:
    pal = np.asarray(palette, dtype=np.int64).reshape(-1, 3)
    if len(pal) > 256:
        raise ValueError(f"a PNG palette holds at most 256 colours, got {len(pal)}")
    return pal.clip(0, 255).astype(np.uint8)


def _label_array(label: Any) -> np.ndarray:
    lab = np.asarray(label.cpu() if isinstance(label, torch.Tensor) else label)
    if lab.ndim != 2:
        raise ValueError(f"label: expected a (H, W) array of class ids, got shape {lab.shape}")
    if lab.size and (lab.min() < 0 or lab.max() > 255):
        raise ValueError(f"label: class ids must be in 0..255 for a palette PNG, got {lab.min()}..{lab.max()}")
    return lab.astype(np.uint8)


def colorize(label: Any, palette: Sequence[Sequence[int]]) -> Image.Image:
    """Class ids ``(H, W)`` (0..255) -> a mode "P" image: pixel values are the ids, colours come from
    ``palette`` (a list of ``[r, g, b]``; ids past its end are black). ``.convert("RGB")`` gives the colours;
    ``.save("x.png")`` writes a label PNG."""
    pal = _palette_rgb(palette)
    im = Image.fromarray(_label_array(label))  # mode "L"; putpalette turns it into "P" and keeps the values
    flat = np.zeros((256, 3), np.uint8)
    flat[: len(pal)] = pal
    im.putpalette(flat.reshape(-1).tolist())
    return im


def _rgb_array(image: Any) -> np.ndarray:
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    img = np.asarray(image)
    if img.ndim == 2:
        img = np.stack([img] * 3, axis=-1)
    if img.ndim != 3 or img.shape[-1] != 3 or img.dtype != np.uint8:
        raise ValueError(f"image: expected uint8 (H, W, 3) RGB, got {img.dtype} {img.shape}")
    return img


def overlay(image: Any, label: Any, palette: Sequence[Sequence[int]], alpha: float = 0.5) -> Image.Image:
    """``(1 - alpha) * image + alpha * colour`` per pixel as an RGB image; pixels whose id has no palette entry
    (e.g. the ignore value 255 of a ground-truth mask) keep the image. ``image``: uint8 ``(H, W, 3)`` / ``(H, W)``
    array or a PIL image of the label's size."""
    if not 0.0 <= float(alpha) <= 1.0:
        raise SETRConfigError(f"alpha: must be in [0, 1], got {alpha!r}")
    img = _rgb_array(image)
    lab = _label_array(label)
    if img.shape[:2] != lab.shape:
        raise ValueError(f"overlay: image size {img.shape[1]}x{img.shape[0]} != label size {lab.shape[1]}x{lab.shape[0]}")
    pal = _palette_rgb(palette)
    lut = np.zeros((256, 3), np.float32)
    lut[: len(pal)] = pal
    blend = (1.0 - alpha) * img.astype(np.float32) + alpha * lut[lab]
    out = np.where((lab < len(pal))[..., None], np.rint(blend).clip(0, 255), img).astype(np.uint8)
    return Image.fromarray(out)


def side_by_side_image(image: Any, label: Any, palette: Sequence[Sequence[int]]) -> Image.Image:
    """The image and :func:`colorize` of ``label`` next to each other: an RGB image twice as wide."""
    img = _rgb_array(image)
    colour = np.asarray(colorize(label, palette).convert("RGB"))
    return Image.fromarray(np.concatenate([img, colour], axis=1))


# ---------------------------------------------------------------------------------------- predicting
def resolve_device(name: str | None = "auto") -> torch.device:
    """``auto`` -> ``cuda`` when a GPU is available, else ``cpu``; ``cpu``, ``cuda`` and ``cuda:N`` as given."""
    text = str(name or "auto").strip().lower()
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(text)
    except (RuntimeError, ValueError) as e:
        raise SETRConfigError(f"device: unknown device {name!r}; use auto, cpu, cuda or cuda:N") from e
    if dev.type not in ("cpu", "cuda"):
        raise SETRConfigError(f"device: unsupported device {name!r}; use auto, cpu, cuda or cuda:N")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise SETRConfigError(f"device: {name} requested but no CUDA GPU is available; use device=auto or cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise SETRConfigError(f"device: {name} requested but only {torch.cuda.device_count()} GPU(s) exist")
    return dev


def inference_config(meta: Mapping[str, Any], override: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The checkpoint's ``meta["inference"]`` with the non-null keys of ``override`` on top. Mode ``slide``
    without ``crop_size`` / ``stride`` takes the checkpoint's ``crop_size`` and 2/3 of it as stride."""
    cfg = dict(meta.get("inference") or {})
    for key, value in dict(override or {}).items():
        if key not in INFERENCE_KEYS:
            raise SETRConfigError(f"inference.{key}: unknown key; use {', '.join(INFERENCE_KEYS)}")
        if value is not None:
            cfg[key] = value
    cfg.setdefault("mode", "whole")
    if cfg["mode"] == "slide":
        if cfg.get("crop_size") is None:
            cfg["crop_size"] = meta.get("crop_size")
        if cfg.get("stride") is None and cfg.get("crop_size") is not None:
            crop = cfg["crop_size"]
            crop = [crop, crop] if isinstance(crop, int) else list(crop)
            cfg["stride"] = [max(1, int(c) * 2 // 3) for c in crop]
    return cfg


def to_tensor(image: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 RGB ``(H, W, 3)`` -> float ``(1, 3, H, W)`` of ``(rgb - mean) / std`` (mean / std on the 0..255 scale)."""
    x = torch.from_numpy(np.array(image, dtype=np.float32)).permute(2, 0, 1)
    m = torch.as_tensor(list(mean), dtype=torch.float32).view(3, 1, 1)
    s = torch.as_tensor(list(std), dtype=torch.float32).view(3, 1, 1)
    return ((x - m) / s)[None]


def predict_batch(model: torch.nn.Module, images: Sequence[np.ndarray], meta: Mapping[str, Any],
                  inference: Mapping[str, Any], device: torch.device | str = "cpu") -> np.ndarray:
    """Class ids ``(B, H, W)`` uint8 of uint8 RGB ``images`` that share one size: one
    :func:`setr.inference.infer` call with the ``inference`` settings, argmax over classes."""
    from setr.inference import infer

    x = torch.cat([to_tensor(im, meta["mean"], meta["std"]) for im in images]).to(device)
    try:
        logits = infer(model, x, inference, out_size=x.shape[-2:])
    except SETRConfigError as e:  # infer names the keys of train's data.inference node; here they are inference.*
        raise SETRConfigError(str(e).replace("data.inference.", "inference.", 1)) from e
    return logits.argmax(1).to(torch.uint8).cpu().numpy()


def predict_image(model: torch.nn.Module, image: np.ndarray, meta: Mapping[str, Any],
                  inference: Mapping[str, Any] | None = None, device: torch.device | str = "cpu") -> np.ndarray:
    """Class ids ``(H, W)`` of one uint8 RGB image; ``inference`` overrides keys of the checkpoint's settings."""
    return predict_batch(model, [image], meta, inference_config(meta, inference), device)[0]


def plan_batches(paths: Sequence[Path], batch_size: int) -> list[list[int]]:
    """Indices of ``paths`` in batches of at most ``batch_size`` images of one size (read from the file
    headers), in order of first appearance; a file whose header cannot be read gets a batch of its own."""
    groups: dict[Any, list[int]] = {}
    for i, p in enumerate(paths):
        try:
            with Image.open(p) as im:
                key: Any = im.size
        except Exception:  # noqa: BLE001 - reported when the file is read
            key = ("unreadable", i)
        groups.setdefault(key, []).append(i)
    size = max(1, int(batch_size))
    return [idx[j : j + size] for idx in groups.values() for j in range(0, len(idx), size)]


def _first_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return lines[0] if lines else type(e).__name__


def predict_files(model: torch.nn.Module, meta: Mapping[str, Any], paths: Sequence[str | Path],
                  output_dir: str | Path, *, batch_size: int = 4, inference: Mapping[str, Any] | None = None,
                  alpha: float = 0.5, side_by_side: bool = False, device: torch.device | str = "cpu",
                  progress: bool | None = None, on_failure: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Predict each file of ``paths`` and write its label / overlay (/ side) PNGs into ``output_dir``.

    A file that cannot be read (or runs out of GPU memory on its own) is reported through ``on_failure``
    (default: one ``skipped: <file>: <reason>`` line on stderr) and skipped. ``progress``: show a rich progress
    bar (None: when stdout is a terminal). Returns ``{"processed", "failed", "failures": ["<file>: <reason>"],
    "outputs": {input path: label PNG path}}``.
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    if not 0.0 <= float(alpha) <= 1.0:
        raise SETRConfigError(f"alpha: must be in [0, 1], got {alpha!r}")
    paths = [Path(p) for p in paths]
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    num_classes = int(meta["num_classes"])
    if num_classes > 256:
        raise SETRConfigError(f"ckpt_path: {num_classes} classes do not fit a palette PNG (at most 256)")
    palette = meta.get("palette") or default_palette(num_classes)
    inf = inference_config(meta, inference)
    stems = output_stems(paths)
    failures: list[str] = []
    outputs: dict[str, str] = {}
    report = on_failure or (lambda msg: print(f"skipped: {msg}", file=sys.stderr, flush=True))
    model = model.eval()

    def fail(msg: str) -> None:
        failures.append(msg)
        report(msg)

    def write(i: int, image: np.ndarray, label: np.ndarray) -> None:
        stem = stems[i]
        label_path = out / f"{stem}_label.png"
        colorize(label, palette).save(label_path)
        overlay(image, label, palette, alpha).save(out / f"{stem}_overlay.png")
        if side_by_side:
            side_by_side_image(image, label, palette).save(out / f"{stem}_side.png")
        outputs[str(paths[i])] = str(label_path)

    def run_group(idx: list[int], images: list[np.ndarray]) -> None:
        try:
            labels = predict_batch(model, images, meta, inf, device)
        except torch.OutOfMemoryError:
            labels = None  # retried below, outside the handler: its traceback holds the batch's tensors
        if labels is not None:
            for i, im, lab in zip(idx, images, labels):
                write(i, im, lab)
            return
        torch.cuda.empty_cache()
        if len(idx) > 1:  # one by one
            for i, im in zip(idx, images):
                run_group([i], [im])
            return
        h, w = images[0].shape[:2]
        fail(f"{paths[idx[0]]}: out of GPU memory at {w}x{h}; try inference.mode=slide or device=cpu")

    show = sys.stdout.isatty() if progress is None else bool(progress)
    columns = (TextColumn("predict"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    # a TTY's live bar takes in stderr lines (else they garble it) unless stderr goes elsewhere (2>file)
    with Progress(*columns, disable=not show, redirect_stderr=sys.stderr.isatty()) as bar:
        task = bar.add_task("predict", total=len(paths))
        for batch in plan_batches(paths, batch_size):
            loaded: list[tuple[int, np.ndarray]] = []
            for i in batch:
                try:
                    loaded.append((i, read_image(paths[i])))
                except DataError as e:
                    fail(_first_line(e))
                except Exception as e:  # noqa: BLE001 - e.g. PIL's DecompressionBombError: skip the file too
                    fail(f"{paths[i]}: {type(e).__name__}: {_first_line(e)}")
            by_size: dict[tuple[int, int], list[tuple[int, np.ndarray]]] = {}
            for i, im in loaded:  # headers and pixels agree but for odd files: regroup on the decoded size
                by_size.setdefault(im.shape[:2], []).append((i, im))
            for group in by_size.values():
                run_group([i for i, _ in group], [im for _, im in group])
            bar.advance(task, len(batch))
    return {"processed": len(outputs), "failed": len(failures), "failures": failures, "outputs": outputs}


# --------------------------------------------------------------------------------------- entry point
def _positive_int(value: Any, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise SETRConfigError(f"{key}: must be a positive integer, got {value!r}")
    return value


def run(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """What ``src/predict.py`` does with its config: check it, collect the inputs, load the checkpoint, predict,
    print a summary. Returns the final JSON line's dict: ``processed, failed, failures, output_dir, device``."""
    from omegaconf import DictConfig, OmegaConf

    from setr.utils.run import extras

    if not isinstance(cfg, DictConfig):
        cfg = OmegaConf.create(dict(cfg))
    for key, what in (("ckpt_path", "a checkpoint written by src/train.py"),
                      ("input", "an image file, a folder or a glob pattern")):
        if key not in cfg or OmegaConf.is_missing(cfg, key) or cfg[key] in (None, ""):
            raise SETRConfigError(f"{key}: required; pass {key}=<{what}>")
    extras(cfg)
    batch_size = _positive_int(cfg.get("batch_size", 4), "batch_size")
    alpha = cfg.get("alpha", 0.5)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 <= alpha <= 1.0:
        raise SETRConfigError(f"alpha: must be a number in [0, 1], got {alpha!r}")
    override = cfg.get("inference")
    override = OmegaConf.to_container(override, resolve=True) if isinstance(override, DictConfig) else override
    if override is not None and not isinstance(override, Mapping):
        raise SETRConfigError(f"inference: expected a mapping of {', '.join(INFERENCE_KEYS)} or null, got {override!r}")
    paths = collect_inputs(cfg.input)
    device = resolve_device(cfg.get("device", "auto"))
    ckpt = Path(str(cfg.ckpt_path)).expanduser()
    if not ckpt.is_file():  # before importing Lightning: a typo fails fast
        raise SETRConfigError(f"ckpt_path: checkpoint {ckpt} not found")
    out_dir = Path(str(cfg.get("output_dir") or "predictions")).expanduser()
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SETRConfigError(f"output_dir: cannot create {out_dir} ({_first_line(e)})") from e

    from setr.training.module import load_checkpoint_model

    model, meta = load_checkpoint_model(ckpt, map_location=device)  # one SETRConfigError line if unusable
    print(f"{len(paths)} image(s) -> {out_dir} | {meta['num_classes']} classes | device {device} | "
          f"inference {inference_config(meta, override)}", flush=True)
    start = time.perf_counter()
    result = predict_files(model, meta, paths, out_dir, batch_size=batch_size, inference=override, alpha=float(alpha),
                           side_by_side=bool(cfg.get("side_by_side", False)), device=device)
    took = time.perf_counter() - start
    print(f"predicted {result['processed']} of {len(paths)} image(s) in {took:.1f} s -> {out_dir}", flush=True)
    if result["failures"]:
        print(f"failed ({result['failed']}):", flush=True)
        for line in result["failures"]:
            print(f"  {line}", flush=True)
    return {"processed": result["processed"], "failed": result["failed"], "failures": result["failures"],
            "output_dir": str(out_dir.resolve()), "device": str(device)}
