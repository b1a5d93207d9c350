"""Run a trained checkpoint on image files: the logic behind ``src/predict.py``.

For each input ``<stem>.<ext>`` it writes into the output folder:

* ``<stem>_label.png``: a mode "P" PNG whose pixel values are the class ids, with the checkpoint's palette;
* ``<stem>_overlay.png``: the image blended with the class colours (``alpha`` of colour);
* ``<stem>_side.png`` (``side_by_side=true``): the image and the coloured prediction side by side.

Inputs of two files with the same stem get ``<stem>_<ext>`` (then ``-2``, ``-3``...) instead, so none is
overwritten. Each photo first gets the checkpoint's test-time resize (``record.test_pipeline``, e.g. ADE20K's
short side 512: the scale the model was trained and validated at; ``resize=false`` keeps the native size), and
the logits are resized back, so every output has the photo's size. ``batch_size`` images of one size go through
one forward. ``ckpt_path`` may also be a released SETR checkpoint (official or mmsegmentation): it is converted
in memory with ``setr-convert``'s defaults. The array-level steps (resize, normalise, infer, argmax)
are :func:`setr.inference.predict_images`, which the notebooks call too; this module adds files, batching,
failures and the outputs.
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

from setr.data.base import read_image
from setr.errors import DataError, SETRConfigError
from setr.inference import INFERENCE_KEYS, NonFiniteLogits, check_inference, inference_config, predict_images
from setr.utils.launch import task_wrapper
from setr.utils.output import print_last_line
from setr.values import positive_int, resolve_device
from setr.visualize import colorize, overlay, side_by_side_image

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm")


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


# ---------------------------------------------------------------------------------------- predicting
def plan_batches(paths: Sequence[Path], batch_size: int) -> list[list[int]]:
    """Indices of ``paths`` in batches of at most ``batch_size`` images of one size (read from the file
    headers), in order of first appearance; a file whose header cannot be read gets a batch of its own."""
    groups: dict[Any, list[int]] = {}
    for i, p in enumerate(paths):
        try:
            with Image.open(p) as im:
                key: Any = im.size
        except Exception:  # reported when the file is read
            key = ("unreadable", i)
        groups.setdefault(key, []).append(i)
    size = max(1, int(batch_size))
    return [idx[j : j + size] for idx in groups.values() for j in range(0, len(idx), size)]


def _first_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return lines[0] if lines else type(e).__name__


def size_text(size: Sequence[int]) -> str:
    """``(h, w)`` -> ``"WxH"``, the order image viewers print."""
    return f"{int(size[1])}x{int(size[0])}"


def predict_files(model: torch.nn.Module, paths: Sequence[str | Path], output_dir: str | Path, *,
                  batch_size: int = 4, inference: Mapping[str, Any] | None = None, resize: bool = True,
                  alpha: float = 0.5, side_by_side: bool = False, device: torch.device | str = "cpu",
                  progress: bool | None = None, on_failure: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Predict each file of ``paths`` with ``model`` (from :func:`setr.load_model`: its ``record`` gives the
    palette, normalisation, inference settings and test-time resize) and write its label / overlay (/ side) PNGs
    into ``output_dir``.

    A file that cannot be read (or runs out of GPU memory on its own) is reported through ``on_failure``
    (default: one ``skipped: <file>: <reason>`` line on stderr) and skipped. ``progress``: show a rich progress
    bar (None: when stdout is a terminal). Returns ``{"processed", "failed", "failures": ["<file>: <reason>"],
    "outputs": {input path: label PNG path}, "model_sizes": {photo "WxH": network input "WxH"}}``.
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    if not 0.0 <= float(alpha) <= 1.0:
        raise SETRConfigError(f"alpha: must be in [0, 1], got {alpha!r}")
    record = getattr(model, "record", None)
    if record is None:
        raise SETRConfigError("model: no record; load it with setr.load_model")
    if record.num_classes > 256:
        raise SETRConfigError(f"ckpt_path: {record.num_classes} classes do not fit a palette PNG (at most 256)")
    paths = [Path(p) for p in paths]
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    palette = record.palette
    inf = inference_config(record, inference)
    check_inference(inf, "inference")  # one line before any file is read or forward run
    stems = output_stems(paths)
    failures: list[str] = []
    outputs: dict[str, str] = {}
    model_sizes: dict[str, str] = {}
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
            pred = predict_images(model, images, inf, resize=resize, device=device)
        except torch.OutOfMemoryError:
            pred = None  # retried below, outside the handler: its traceback holds the batch's tensors
        except NonFiniteLogits as e:  # broken weights: stop, no label is written from NaN / inf
            names = ", ".join(str(paths[i]) for i in idx[:3]) + (", ..." if len(idx) > 3 else "")
            raise NonFiniteLogits(f"{names}: {e}") from e
        if pred is not None:
            model_sizes[size_text(images[0].shape[:2])] = size_text(pred.input_size)
            for i, im, lab in zip(idx, images, pred.labels):
                write(i, im, lab)
            return
        torch.cuda.empty_cache()
        if len(idx) > 1:  # one by one
            for i, im in zip(idx, images):
                run_group([i], [im])
            return
        fail(f"{paths[idx[0]]}: out of GPU memory at {size_text(images[0].shape[:2])}; "
             "try inference.mode=slide or device=cpu")

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
                except Exception as e:  # e.g. PIL's DecompressionBombError: skip the file too
                    fail(f"{paths[i]}: {type(e).__name__}: {_first_line(e)}")
            by_size: dict[tuple[int, int], list[tuple[int, np.ndarray]]] = {}
            for i, im in loaded:  # headers and pixels agree but for odd files: regroup on the decoded size
                by_size.setdefault(im.shape[:2], []).append((i, im))
            for group in by_size.values():
                run_group([i for i, _ in group], [im for _, im in group])
            bar.advance(task, len(batch))
    return {"processed": len(outputs), "failed": len(failures), "failures": failures, "outputs": outputs,
            "model_sizes": model_sizes}


# --------------------------------------------------------------------------------------- entry point
def describe_resize(steps: Sequence[Mapping[str, Any]], resize: bool) -> str:
    """The test-time resize in a few words for the header line: ``RandomRescale(img_scale=[2048, 512], ...)``."""
    if not resize:
        return "off (resize=false: native size)"
    if not steps:
        return "none in the checkpoint (native size)"
    parts = []
    for step in steps:
        args = ", ".join(f"{k}={v}" for k, v in step.items() if k != "_target_")
        parts.append(f"{str(step['_target_']).rsplit('.', 1)[-1]}({args})")
    return " + ".join(parts)


def predict(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """What ``src/predict.py`` does with its config: check it, collect the inputs, load the checkpoint, predict.
    Returns the final JSON line's dict: ``processed, failed, failures, output_dir, device, resize, model_sizes``
    (``model_sizes``: for each photo size "WxH", the size the network ran at)."""
    from omegaconf import DictConfig, OmegaConf

    from setr.checkpoint import load_model
    from setr.utils.config import extras
    from setr.utils.schema import check_added_keys

    if not isinstance(cfg, DictConfig):
        cfg = OmegaConf.create(dict(cfg))
    check_added_keys(cfg)  # a `+key` nothing reads (+batch_sz=8): refused, not ignored
    for key, what in (("ckpt_path", "a checkpoint written by setr-train"),
                      ("input", "an image file, a folder or a glob pattern")):
        if key not in cfg or OmegaConf.is_missing(cfg, key) or cfg[key] in (None, ""):
            raise SETRConfigError(f"{key}: required; pass {key}=<{what}>")
    batch_size = positive_int(cfg.get("batch_size", 4), "batch_size")
    alpha = cfg.get("alpha", 0.5)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 <= alpha <= 1.0:
        raise SETRConfigError(f"alpha: must be a number in [0, 1], got {alpha!r}")
    resize = cfg.get("resize", True)
    if not isinstance(resize, bool):
        raise SETRConfigError(f"resize: must be true or false, got {resize!r}")
    override = cfg.get("inference")
    override = OmegaConf.to_container(override, resolve=True) if isinstance(override, DictConfig) else override
    if override is not None and not isinstance(override, Mapping):
        raise SETRConfigError(f"inference: expected a mapping of {', '.join(INFERENCE_KEYS)} or null, got {override!r}")
    extras(cfg)  # after the checks of the options: an error is the first thing printed
    paths = collect_inputs(cfg.input)
    device = resolve_device(cfg.get("device", "auto"))
    ckpt = Path(str(cfg.ckpt_path)).expanduser()
    if not ckpt.is_file():  # before output_dir is created: a typo leaves no empty folder behind
        raise SETRConfigError(f"ckpt_path: checkpoint {ckpt} not found")
    out_dir = Path(str(cfg.get("output_dir") or "predictions")).expanduser()
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SETRConfigError(f"output_dir: cannot create {out_dir} ({_first_line(e)})") from e

    # one SETRConfigError line if unusable; a released SETR checkpoint is converted in memory (a line says so)
    convert = OmegaConf.to_container(cfg.convert, resolve=True) if isinstance(cfg.get("convert"), DictConfig) else {}
    model = load_model(ckpt, map_location=device, convert=convert)
    record = model.record
    check_inference(inference_config(record, override), "inference")
    print(f"{len(paths)} image(s) -> {out_dir} | {record.num_classes} classes | device {device} | "
          f"inference {inference_config(record, override)} | "
          f"test resize {describe_resize(record.test_pipeline, resize)}", flush=True)
    start = time.perf_counter()
    result = predict_files(model, paths, out_dir, batch_size=batch_size, inference=override, resize=resize,
                           alpha=float(alpha), side_by_side=bool(cfg.get("side_by_side", False)), device=device)
    took = time.perf_counter() - start
    sizes = ", ".join(f"{k} -> {v}" for k, v in list(result["model_sizes"].items())[:6])
    more = len(result["model_sizes"]) - 6
    sizes += f", ... ({more} more sizes)" if more > 0 else ""
    print(f"predicted {result['processed']} of {len(paths)} image(s) in {took:.1f} s -> {out_dir}; "
          f"model ran at (photo -> network input): {sizes or '-'}", flush=True)
    if result["failures"]:
        print(f"failed ({result['failed']}):", flush=True)
        for line in result["failures"]:
            print(f"  {line}", flush=True)
    return {"processed": result["processed"], "failed": result["failed"], "failures": result["failures"],
            "output_dir": str(out_dir.resolve()), "device": str(device), "resize": resize,
            "model_sizes": result["model_sizes"]}


@task_wrapper
def run(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The job of ``src/predict.py``: :func:`predict`, then the final JSON line. Exit code 1 when some images
    failed: the others were written, but a script must not take a partial run for a complete one."""
    result = predict(cfg)
    print_last_line(result)
    if result["failed"]:
        raise SystemExit(1)
    return result
