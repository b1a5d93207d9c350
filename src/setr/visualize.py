"""Drawing label maps: palette PNGs, colour overlays, side-by-side views, and undoing the normalisation.

Used by ``src/predict.py``, the W&B sample callback and the notebooks, so a label map looks the same everywhere.
Everything works on plain arrays (uint8 RGB ``(H, W, 3)`` images, ``(H, W)`` class ids) or tensors.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

from setr.errors import SETRConfigError


def denormalize(image: torch.Tensor | np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """A normalised ``(3, H, W)`` image (``(pixel - mean) / std``, mean / std on the 0..255 scale) back to uint8
    RGB ``(H, W, 3)``, clipped to 0..255."""
    x = torch.as_tensor(image).detach().float().cpu()
    if x.ndim != 3 or x.shape[0] != 3:
        raise ValueError(f"image: expected a normalised (3, H, W) tensor, got shape {tuple(x.shape)}")
    m = torch.as_tensor(list(mean), dtype=torch.float32).view(3, 1, 1)
    s = torch.as_tensor(list(std), dtype=torch.float32).view(3, 1, 1)
    return (x * s + m).round().clamp(0, 255).byte().permute(1, 2, 0).numpy()


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


def colorize(label: Any, palette: Sequence[Sequence[int]], other: Sequence[int] = (0, 0, 0)) -> Image.Image:
    """Class ids ``(H, W)`` (0..255) -> a mode "P" image: pixel values are the ids, colours come from
    ``palette`` (a list of ``[r, g, b]``). Ids past its end get ``other`` (default black; a data notebook shows
    the ignore value 255 of ground-truth masks in white, apart from every class). ``.convert("RGB")`` gives the
    colours; ``.save("x.png")`` writes a label PNG."""
    pal = _palette_rgb(palette)
    im = Image.fromarray(_label_array(label))  # mode "L"; putpalette turns it into "P" and keeps the values
    flat = np.tile(np.asarray(other, np.uint8).reshape(1, 3), (256, 1))
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
        raise ValueError(f"overlay: image size {img.shape[1]}x{img.shape[0]} != "
                         f"label size {lab.shape[1]}x{lab.shape[0]}")
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
