"""Inference modes, kept apart from the model: whole image, sliding window, multi-scale + flip.

``infer(model, images, cfg, out_size)`` returns logits ``(B, C, *out_size)``; validation, ``eval.py`` and
``predict.py`` all go through it. ``cfg`` is the ``data.inference`` node:

* ``mode``: ``whole`` (one forward of the full image) or ``slide`` (windows of ``crop_size`` every ``stride``
  pixels, ``batch_size`` windows per forward (null / ``auto``, the default: sized from the device, see
  :func:`auto_windows`), overlapping logits averaged; images smaller than the crop are padded and cropped back —
  mmsegmentation's ``slide_inference``); logits are float32 whatever precision the network runs in. A stride
  longer than the window on either axis is refused (:func:`check_inference`): its windows would leave pixels
  between them that no window sees, whose logits would be 0/0;
* ``scales`` (ratios, default ``[1.0]``) and ``flip``: multi-scale + horizontal-flip testing; the output of every
  scale/flip is resized to ``out_size`` and averaged. Without ``img_scale`` a ratio scales the input size.
* ``img_scale: [long, short]``: a ratio ``r`` resizes the input as mmsegmentation's keep-ratio ``Resize`` to the
  scale ``(int(long * r), int(short * r))`` inside ``MultiScaleFlipAug``: by ``min(long' / L, short' / S)``, so
  give it the ORIGINAL image (``data.val_pipeline: []``). ``min_short`` (the official SETR test's
  ``setr_multi_scale``, set to the crop size): instead, the short side becomes ``max(short', min_short)``, the long
  side following the aspect ratio uncapped, so no scale is smaller than a window.
* ``average``: ``logits`` (default) or ``probs``: average softmax probabilities, as mmsegmentation's ``aug_test``
  (the official protocol); the result is then their log, a valid logit map for the loss and the argmax.

``conf/protocol/ms.yaml`` sets the official multi-scale + flip test from the data config's ``test_scale`` and
``ms_ratios``.

No number is made of broken logits: a NaN or infinite value in what the network returns stops :func:`infer` with
one :class:`NonFiniteLogits` line (validation, ``eval.py`` and ``predict.py`` all call it), instead of argmax
turning it into class 0. A whole-image forward of a very large image logs one line first (:func:`warn_if_slow`).

The second half works on photos as arrays (uint8 RGB ``(H, W, 3)``) with a network from
:func:`setr.load_model`: :func:`predict_images` applies the checkpoint's test-time resize
(``record.test_pipeline``), normalises, calls :func:`infer` with the record's inference settings and returns class
ids at each photo's own size. ``src/predict.py`` and ``notebooks/02_predict.ipynb`` both go through it, so a
photo gets the same labels in a notebook as from the command line.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

from setr.errors import SETRConfigError
from setr.values import size_pair

if TYPE_CHECKING:
    from setr.checkpoint import ModelRecord

log = logging.getLogger("setr")

MODES = ("whole", "slide")
INFERENCE_KEYS = ("mode", "crop_size", "stride", "batch_size", "scales", "flip", "img_scale", "min_short", "average")
AVERAGES = ("logits", "probs")


class NonFiniteLogits(SETRConfigError):
    """The network returned NaN or infinite logits: argmax would make them a class, so nothing is scored or
    written from them (broken weights, or an overflow under the inference settings)."""


# windows per forward on a CPU when data.inference.batch_size is null / auto (measured: README "Inference modes")
CPU_WINDOWS = 8
MAX_WINDOWS = 64  # cap of the CUDA estimate: past this the GPU is saturated and only memory is spent
AUTO = ("auto", None)


def check_batch_size(value: Any) -> int | None:
    """``data.inference.batch_size``: a positive int, or None for ``null`` / ``auto`` (see :func:`auto_windows`)."""
    if value in AUTO:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise SETRConfigError(f"data.inference.batch_size: expected a positive number of windows per forward, "
                              f"null or auto, got {value!r}")
    return value


def _model_width(model) -> tuple[int, int, int]:
    """(embed dim, patch size, number of classes) of a SETR network (plain, compiled or in a Lightning module);
    ViT-L / 16 / 150 when they cannot be read (a traced or exported graph)."""
    net = getattr(model, "_orig_mod", model)
    net = getattr(net, "model", net) if not hasattr(net, "encoder") else net
    enc = getattr(net, "encoder", None)
    dim = int(getattr(enc, "embed_dim", 1024) or 1024)
    patch = int(getattr(enc, "patch_size", 16) or 16)
    classes = int(getattr(net, "num_classes", 0) or 150)
    return dim, patch, classes


def window_bytes(model, crop: tuple[int, int], elem: int = 4) -> int:
    """A generous estimate of the memory one window of ``crop`` needs in an inference forward: the widest
    transformer activations (tokens x dim x (qkv 3 + MLP 4 + residuals), with the attention matrix of the math
    path) plus the head's full-resolution maps (logits of every class and the upsampled features)."""
    dim, patch, classes = _model_width(model)
    tokens = (-(-crop[0] // patch)) * (-(-crop[1] // patch))
    encoder = tokens * dim * 12 + tokens * tokens * 4
    head = crop[0] * crop[1] * (2 * classes + 128)
    return elem * (encoder + head)


def auto_windows(model, images: torch.Tensor, crop: tuple[int, int], n_windows: int) -> int:
    """Windows per forward when ``data.inference.batch_size`` is null / ``auto``: on CUDA as many as half the
    free memory holds (``torch.cuda.mem_get_info`` over :func:`window_bytes`, at most :data:`MAX_WINDOWS` images
    per forward), on other devices :data:`CPU_WINDOWS`; never more than the image has, at least 1."""
    b = images.shape[0]
    if images.device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(images.device)
        crops = int(free * 0.5 // max(1, window_bytes(model, crop)))
        windows = min(crops, MAX_WINDOWS) // max(1, b)
    else:
        windows = CPU_WINDOWS
    return max(1, min(windows, n_windows))


def _covers(boxes: Sequence[tuple[int, int, int, int]], h: int, w: int) -> bool:
    """Whether the windows ``(y1, x1, y2, x2)`` of a grid (every row with every column) cover ``h x w``: each
    axis's intervals, in order, leave no gap and reach the end."""
    for lo, hi, size in ((0, 2, h), (1, 3, w)):
        reached = 0
        for a, b in sorted({(box[lo], box[hi]) for box in boxes}):
            if a > reached:
                return False
            reached = max(reached, b)
        if reached < size:
            return False
    return True


def slide(model, images: torch.Tensor, crop_size, stride, batch_size: int | str | None = None) -> torch.Tensor:
    """Sliding-window logits at the input size (mmseg grid: ``max(h - crop + stride - 1, 0) // stride + 1``),
    ``batch_size`` windows (of every image of the batch) per forward; None / ``auto``: :func:`auto_windows`.
    Every pixel is in at least one window (a stride longer than the crop is refused before any forward)."""
    ch, cw = size_pair(crop_size, "data.inference.crop_size")
    sh, sw = size_pair(stride, "data.inference.stride")
    _check_stride((ch, cw), (sh, sw))
    b, _, h, w = images.shape
    pad_h, pad_w = max(ch - h, 0), max(cw - w, 0)
    if pad_h or pad_w:
        images = F.pad(images, (0, pad_w, 0, pad_h))
    H, W = images.shape[-2:]
    rows = max(H - ch + sh - 1, 0) // sh + 1
    cols = max(W - cw + sw - 1, 0) // sw + 1
    boxes = []
    for r in range(rows):
        for c in range(cols):
            y1, x1 = min(r * sh, max(H - ch, 0)), min(c * sw, max(W - cw, 0))
            boxes.append((y1, x1, min(y1 + ch, H), min(x1 + cw, W)))
    if not _covers(boxes, H, W):  # guard: the grid above covers everything whenever the stride fits the crop
        raise SETRConfigError(f"data.inference.stride: windows of {ch}x{cw} every {sh}x{sw} pixels leave pixels "
                              f"of a {H}x{W} image uncovered")
    per = check_batch_size(batch_size)
    if per is None:
        per = auto_windows(model, images, (ch, cw), len(boxes))
    logits = None
    count = images.new_zeros((1, 1, H, W))
    for i in range(0, len(boxes), per):
        chunk = boxes[i : i + per]
        crops = torch.cat([images[:, :, y1:y2, x1:x2] for y1, x1, y2, x2 in chunk])
        out = model(crops)
        if logits is None:
            logits = images.new_zeros((b, out.shape[1], H, W), dtype=torch.float32)
        for k, (y1, x1, y2, x2) in enumerate(chunk):
            logits[:, :, y1:y2, x1:x2] += out[k * b : (k + 1) * b]
            count[:, :, y1:y2, x1:x2] += 1
    return (logits / count)[..., :h, :w]


def scaled_size(h: int, w: int, ratio: float, img_scale: Sequence[int] | None = None,
                min_short: int | None = None) -> tuple[int, int]:
    """The ``(height, width)`` an ``h x w`` input is resized to for one test scale ``ratio`` (see the module
    docstring): mmcv's ``rescale_size`` rounding, ``int(side * factor + 0.5)``."""
    if img_scale is None:
        factor_h = factor_w = ratio
    else:
        long, short = max(img_scale) * ratio, min(img_scale) * ratio
        long, short = int(long), int(short)
        if min_short is not None:
            factor_h = factor_w = max(short, int(min_short)) / min(h, w)
        else:
            factor_h = factor_w = min(long / max(h, w), short / min(h, w))
    return max(1, int(h * factor_h + 0.5)), max(1, int(w * factor_w + 0.5))


def _check_stride(crop: tuple[int, int], stride: tuple[int, int], where: str = "data.inference") -> None:
    """A stride longer than the window on an axis leaves the pixels between two windows in none of them."""
    if stride[0] > crop[0] or stride[1] > crop[1]:
        from setr import slide_stride

        hint = slide_stride(list(crop))
        hint_text = hint[0] if hint[0] == hint[1] else hint
        raise SETRConfigError(
            f"{where}.stride: {list(stride)} is longer than the window {where}.crop_size {list(crop)}: the pixels "
            f"between two windows would be in none of them; use a stride <= the crop, e.g. {where}.stride="
            f"{hint_text} (2/3 of it, the paper's ratio)")


def _check(cfg: Mapping, where: str = "data.inference") -> tuple[str, list[float], list[bool], str]:
    mode = cfg.get("mode", "whole")
    if mode not in MODES:
        raise SETRConfigError(f"{where}.mode: unknown mode {mode!r}; choose one of {', '.join(MODES)}")
    try:
        scales = [float(s) for s in (cfg.get("scales") or [1.0])]
    except (TypeError, ValueError) as e:
        raise SETRConfigError(f"{where}.scales: expected a list of ratios, got {cfg.get('scales')!r}") from e
    if min(scales) <= 0:
        raise SETRConfigError(f"{where}.scales: ratios must be > 0, got {scales}")
    if mode == "slide":
        for key in ("crop_size", "stride"):
            if cfg.get(key) is None:
                raise SETRConfigError(f"{where}.{key}: required by mode 'slide'")
        _check_stride(size_pair(cfg["crop_size"], f"{where}.crop_size"), size_pair(cfg["stride"], f"{where}.stride"),
                      where)
    average = cfg.get("average") or "logits"
    if average not in AVERAGES:
        raise SETRConfigError(f"{where}.average: {average!r}; choose one of {', '.join(AVERAGES)}")
    try:
        check_batch_size(cfg.get("batch_size"))
    except SETRConfigError as e:
        raise SETRConfigError(str(e).replace("data.inference.", f"{where}.", 1)) from e
    if cfg.get("img_scale") is not None:
        size_pair(cfg["img_scale"], f"{where}.img_scale")
    if cfg.get("min_short") is not None and (not isinstance(cfg["min_short"], int) or cfg["min_short"] < 1):
        raise SETRConfigError(f"{where}.min_short: expected a positive integer, got {cfg['min_short']!r}")
    if cfg.get("min_short") is not None and cfg.get("img_scale") is None:
        raise SETRConfigError(f"{where}.min_short: needs {where}.img_scale (the official MS test)")
    return mode, scales, [False, True] if cfg.get("flip") else [False], average


def check_inference(cfg: Mapping | None, where: str = "data.inference") -> None:
    """The up-front check of an inference node (``where`` names it in the error: ``data.inference`` for
    train / eval, ``inference`` for predict): every mistake :func:`infer` would meet, one line, before any
    forward (a stride longer than the window included)."""
    _check(dict(cfg or {}), where)


# whole-image forwards beyond these sizes say so (a minutes-long forward with no word looks like a hang)
SLOW_PIXELS = 4096 * 4096
SLOW_CROPS = 16  # or this many times the training crop's pixels
_warned: set[tuple[int, int]] = set()


def warn_if_slow(size: Sequence[int], crop: Sequence[int] | int | None = None) -> bool:
    """Log one line (once per size in a process) when a whole-image forward at ``size`` = ``(h, w)`` will be
    slow: more than :data:`SLOW_PIXELS` pixels, or more than :data:`SLOW_CROPS` times the ``crop`` (the size the
    network was trained at; attention grows with the square of the pixels). Returns whether it warned."""
    h, w = int(size[0]), int(size[1])
    crop_px = None
    if crop is not None:
        ch, cw = (crop, crop) if isinstance(crop, int) else (int(crop[0]), int(crop[1]))
        crop_px = ch * cw
    slow = h * w > SLOW_PIXELS or (crop_px is not None and h * w > SLOW_CROPS * crop_px)
    if not slow or (h, w) in _warned:
        return False
    _warned.add((h, w))
    times = f", {h * w / crop_px:.0f}x the {ch}x{cw} crop" if crop_px else ""
    log.warning("inference: a %dx%d image (%.1f Mpx%s) in mode whole runs the whole image through the network "
                "in one forward and may take minutes and much memory; sliding windows (inference.mode=slide, "
                "data.inference.mode=slide in train / eval) or a test-time resize (predict: resize=true, eval: "
                "data.val_pipeline) keep it at the crop's size", w, h, h * w / 1e6, times)
    return True


@torch.no_grad()
def infer(model: torch.nn.Module, images: torch.Tensor, cfg: Mapping | None = None,
          out_size: Sequence[int] | None = None) -> torch.Tensor:
    """Logits ``(B, C, *out_size)`` of ``images`` (normalised ``(B, 3, H, W)``) with the ``data.inference``
    settings ``cfg`` (see the module docstring); ``out_size`` defaults to the input size."""
    cfg = dict(cfg or {})
    mode, scales, flips, average = _check(cfg)
    h, w = images.shape[-2:]
    target = tuple(out_size) if out_size is not None else (h, w)
    img_scale = cfg.get("img_scale")
    total = None
    finite = None  # one device-side flag for every forward, read once at the end (one sync per call)
    for s in scales:
        size = scaled_size(h, w, s, img_scale, cfg.get("min_short"))
        x = images if size == (h, w) else F.interpolate(images, size=size, mode="bilinear", align_corners=False)
        if mode == "whole":
            warn_if_slow(size, cfg.get("crop_size"))
        for flip in flips:
            xi = x.flip(-1) if flip else x
            if mode == "slide":
                lg = slide(model, xi, cfg["crop_size"], cfg["stride"], cfg.get("batch_size"))
            else:
                lg = model(xi).float()
            if lg.numel():  # aminmax refuses an empty tensor (nothing to check there)
                lo, hi = torch.aminmax(lg)  # NaN propagates to both; one pass, 10x cheaper than isfinite(lg).all()
                ok = lo.isfinite() & hi.isfinite()
                finite = ok if finite is None else finite & ok
            if flip:
                lg = lg.flip(-1)
            if tuple(lg.shape[-2:]) != target:
                lg = F.interpolate(lg, size=target, mode="bilinear", align_corners=False)
            if average == "probs":
                lg = lg.float().softmax(1)
            total = lg if total is None else total + lg
    if finite is not None and not bool(finite):
        raise NonFiniteLogits(
            f"logits: non-finite values (NaN/inf) in the network output for a batch of {images.shape[0]} "
            f"image(s) of {w}x{h} (mode {mode}); the checkpoint's weights or the inference settings are broken, "
            "and no class is made of them")
    n = len(scales) * len(flips)
    mean = total / n if n > 1 else total  # one forward: no pass over the full-size logits for a division by 1
    return mean.clamp_min(1e-12).log() if average == "probs" else mean


# ----------------------------------------------------------------------------- arrays: photos in, class ids out
def inference_config(record: ModelRecord, override: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The record's inference settings with the non-null keys of ``override`` on top (a null key keeps the
    checkpoint's value, so a config can list every key). Mode ``slide`` without ``crop_size`` / ``stride`` takes
    the training crop and 2/3 of it as stride, the ratio of the paper's settings (512/341, 768/512)."""
    cfg = dict(record.inference or {})
    for key, value in dict(override or {}).items():
        if key not in INFERENCE_KEYS:
            raise SETRConfigError(f"inference.{key}: unknown key; use {', '.join(INFERENCE_KEYS)}")
        if value is not None:
            cfg[key] = value
    return fill_slide(cfg, record.crop_size)


def fill_slide(cfg: dict[str, Any], crop_size: Sequence[int]) -> dict[str, Any]:
    """``cfg`` with mode ``whole`` when it has none, and in mode ``slide`` the window ``crop_size`` (the training
    crop) and 2/3 of the window as stride where they are missing (:func:`setr.slide_stride`, the paper's ratio)."""
    from setr import slide_stride

    cfg.setdefault("mode", "whole")
    if cfg["mode"] == "slide":
        if cfg.get("crop_size") is None:
            cfg["crop_size"] = list(crop_size)
        if cfg.get("stride") is None:
            crop = cfg["crop_size"]
            cfg["stride"] = slide_stride([crop, crop] if isinstance(crop, int) else list(crop))
    return cfg


def build_test_resize(record: ModelRecord) -> Callable[[np.ndarray], np.ndarray] | None:
    """The checkpoint's test-time resize as a function of a uint8 RGB image, or None when the record has none.

    These are the data config's ``val_pipeline`` steps, the ones validation scored the model with (ADE20K: keep
    ratio, short side 512, long side <= 2048), so a photo reaches the network at the scale it was trained for
    rather than at its native resolution. They are instantiated by :func:`setr.data.transforms.build_steps`, as
    for validation (same targets, same one-line errors), without the normalisation, which is :func:`normalize`'s,
    the same with or without the resize."""
    if not record.test_pipeline:
        return None
    import albumentations as A

    from setr.data.transforms import build_steps

    resize = A.Compose(build_steps(record.test_pipeline, key="record.test_pipeline"))
    return lambda image: resize(image=image)["image"]


def normalize(image: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 RGB ``(H, W, 3)`` -> float ``(1, 3, H, W)`` of ``(rgb - mean) / std`` (mean / std on the 0..255 scale;
    :func:`setr.visualize.denormalize` undoes it)."""
    x = torch.from_numpy(np.array(image, dtype=np.float32)).permute(2, 0, 1)
    m = torch.as_tensor(list(mean), dtype=torch.float32).view(3, 1, 1)
    s = torch.as_tensor(list(std), dtype=torch.float32).view(3, 1, 1)
    return ((x - m) / s)[None]


@dataclasses.dataclass
class Prediction:
    """What :func:`predict_images` returns.

    Attributes:
        labels: class ids ``(B, H, W)`` uint8 at the photos' own size.
        input: the normalised batch the network was given, ``(B, 3, h, w)`` at the test-time size (the notebook
            maps a photo pixel into it for the attention maps).
    """

    labels: np.ndarray
    input: torch.Tensor

    @property
    def input_size(self) -> tuple[int, int]:
        """``(h, w)`` the network ran at (before the ``scales`` of multi-scale testing)."""
        return int(self.input.shape[-2]), int(self.input.shape[-1])


def predict_images(model: torch.nn.Module, images: Sequence[np.ndarray], inference: Mapping[str, Any] | None = None,
                   *, record: ModelRecord | None = None, resize: bool = True,
                   device: torch.device | str | None = None) -> Prediction:
    """Class ids of uint8 RGB ``images`` that share one size, in one :func:`infer` call.

    ``model``: a network from :func:`setr.load_model` (``record`` defaults to its ``model.record``).
    ``inference``: keys overriding the record's settings (see :func:`inference_config`). ``resize``: apply the
    record's test-time resize (:func:`build_test_resize`) first; the logits are resized back to the photos' size
    either way, so the labels always match the photos. ``device``: default the model's."""
    record = record if record is not None else getattr(model, "record", None)
    if record is None:
        raise SETRConfigError("model: no record; load it with setr.load_model or pass record=")
    if not images:
        raise ValueError("images: expected at least one image")
    out_size = tuple(images[0].shape[:2])
    if any(tuple(im.shape[:2]) != out_size for im in images):
        raise ValueError(f"images: expected one size per call, got {sorted({im.shape[:2] for im in images})}")
    resizer = build_test_resize(record) if resize else None
    if resizer is not None:
        images = [resizer(im) for im in images]
        sizes = {im.shape[:2] for im in images}
        if len(sizes) > 1:
            raise SETRConfigError(f"record.test_pipeline: resizes images of one size to several ({sorted(sizes)}); "
                                  "a test-time resize must be deterministic")
    if device is None:
        device = next(model.parameters()).device
    cfg = inference_config(record, inference)
    check_inference(cfg, "inference")
    if cfg["mode"] == "whole":
        for s in cfg.get("scales") or [1.0]:
            warn_if_slow(scaled_size(*images[0].shape[:2], float(s), cfg.get("img_scale"), cfg.get("min_short")),
                         record.crop_size)
    x = torch.cat([normalize(im, record.mean, record.std) for im in images]).to(device)
    try:
        logits = infer(model, x, cfg, out_size=out_size)
    except NonFiniteLogits:
        raise
    except SETRConfigError as e:  # infer names the keys of train's data.inference node; here they are inference.*
        raise SETRConfigError(str(e).replace("data.inference.", "inference.")) from e
    return Prediction(labels=logits.argmax(1).to(torch.uint8).cpu().numpy(), input=x)


def predict_image(model: torch.nn.Module, image: np.ndarray, inference: Mapping[str, Any] | None = None,
                  **kwargs: Any) -> np.ndarray:
    """Class ids ``(H, W)`` of one uint8 RGB image: :func:`predict_images` of a batch of one."""
    return predict_images(model, [image], inference, **kwargs).labels[0]
