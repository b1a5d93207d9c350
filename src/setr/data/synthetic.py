"""A built-in, learnable segmentation dataset: coloured shapes on textured noise (no download).

Each sample is generated on the fly from ``(seed, split, index)``, so it is identical on every run, worker and
rank. Classes: 0 background, then shape classes (disc, rectangle, triangle, ring, cross, ...). Every shape
class has its own hue family *and* its own geometry, shapes are large against 16-pixel patches, and a thin band
along every shape edge is labelled 255 (ignored), as in VOC-style annotations.
"""

from __future__ import annotations

import colorsys

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from setr.data.base import SegDataset
from setr.data.registry import register_dataset
from setr.errors import SETRConfigError
from setr.values import IGNORE_INDEX

SHAPES = ("disc", "rectangle", "triangle", "ring", "cross", "diamond", "ellipse", "star")
SPLIT_OFFSET = {"train": 0, "val": 1_000_003, "test": 2_000_003}


@register_dataset("synthetic")
class SyntheticShapes(SegDataset):
    """Shapes of ``num_classes - 1`` kinds on textured noise.

    Args:
        split: ``train``, ``val`` or ``test`` (different samples, same distribution).
        num_samples: samples in this split.
        image_size: side of the square images (multiples of 16 keep the token grid exact).
        num_classes: background + shape classes, 2 to 9.
        max_shapes: at most this many shapes per image (at least one).
        min_size, max_size: shape size as a fraction of ``image_size``.
        ignore_border: width in pixels of the ignored band along shape edges (0 for none).
        noise: amplitude of the background texture (0..1).
        seed: base seed; the same seed gives the same data everywhere.
    """

    def __init__(self, split: str = "train", num_samples: int = 256, image_size: int = 128, num_classes: int = 4,
                 max_shapes: int = 3, min_size: float = 0.25, max_size: float = 0.5, ignore_border: int = 1,
                 noise: float = 0.25, seed: int = 0, transform=None, keep_original_mask: bool = False,
                 skip_bad: bool = False) -> None:
        super().__init__(transform=transform, keep_original_mask=keep_original_mask, skip_bad=skip_bad)
        if split not in SPLIT_OFFSET:
            raise SETRConfigError(f"data.split: unknown split {split!r} for the synthetic dataset; use train/val/test")
        if not 2 <= num_classes <= len(SHAPES) + 1:
            raise SETRConfigError(
                f"data.num_classes: the synthetic dataset has 2..{len(SHAPES) + 1} classes, got {num_classes}")
        if num_samples < 1 or image_size < 16 or max_shapes < 1 or not 0 < min_size <= max_size <= 1:
            raise SETRConfigError(
                "data.dataset: synthetic needs num_samples >= 1, image_size >= 16, max_shapes >= 1 and "
                f"0 < min_size <= max_size <= 1 (got {num_samples}, {image_size}, {max_shapes}, {min_size}, {max_size})"
            )
        self.split = split
        self.image_size = image_size
        self.max_shapes = max_shapes
        self.min_size, self.max_size = min_size, max_size
        self.ignore_border = ignore_border
        self.noise = noise
        self.seed = seed
        self.class_names = ["background", *SHAPES[: num_classes - 1]]
        # hue h for class k: evenly spread; the background is grey-ish
        self.palette = [(40, 40, 40)] + [
            tuple(int(255 * c) for c in colorsys.hsv_to_rgb(k / (num_classes - 1), 0.85, 0.95))
            for k in range(num_classes - 1)
        ]
        self.samples = list(range(num_samples))

    def sample_files(self, index: int) -> None:
        """Samples are drawn from their seed, not read from files: the pre-flight check has nothing to open."""
        return None

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng([self.seed, SPLIT_OFFSET[self.split] + int(self.samples[index])])
        s = self.image_size
        # background: low-frequency colour noise plus fine grain
        coarse = rng.random((max(2, s // 16), max(2, s // 16), 3))
        bg = np.asarray(Image.fromarray((coarse * 255).astype(np.uint8)).resize((s, s), Image.BICUBIC), np.float32)
        bg = 110 + (bg - 128) * self.noise + rng.normal(0, 255 * self.noise * 0.15, (s, s, 3))
        image = Image.fromarray(np.clip(bg, 0, 255).astype(np.uint8))
        mask = Image.new("L", (s, s), 0)
        edges = Image.new("L", (s, s), 0)
        n = int(rng.integers(1, self.max_shapes + 1))
        for _ in range(n):
            cls = int(rng.integers(1, self.num_classes))
            size = rng.uniform(self.min_size, self.max_size) * s
            cx, cy = rng.uniform(size / 2, s - size / 2, 2)
            hue = (cls - 1) / (self.num_classes - 1) + rng.uniform(-0.03, 0.03)
            rgb = colorsys.hsv_to_rgb(hue % 1.0, rng.uniform(0.7, 1.0), rng.uniform(0.75, 1.0))
            colour = tuple(int(255 * c) for c in rgb)
            shape_mask = Image.new("L", (s, s), 0)
            _draw_shape(ImageDraw.Draw(shape_mask), SHAPES[cls - 1], cx, cy, size, rng.uniform(0, np.pi))
            # texture inside the shape too, so colour alone is not a flat cue
            fill = np.full((s, s, 3), colour, np.float32) + rng.normal(0, 12, (s, s, 3))
            image.paste(Image.fromarray(np.clip(fill, 0, 255).astype(np.uint8)), (0, 0), shape_mask)
            mask.paste(cls, (0, 0), shape_mask)
            edges.paste(0, (0, 0), shape_mask)  # an occluded shape's edge under this one is no longer an edge
            if self.ignore_border:
                k = 2 * self.ignore_border + 1
                edge = np.asarray(shape_mask.filter(ImageFilter.MaxFilter(k))) != np.asarray(
                    shape_mask.filter(ImageFilter.MinFilter(k)))
                edges.paste(255, (0, 0), Image.fromarray(edge.astype(np.uint8) * 255))
        label = np.asarray(mask, np.int64).copy()
        label[np.asarray(edges) > 0] = IGNORE_INDEX
        return np.asarray(image), label


def _draw_shape(draw: ImageDraw.ImageDraw, kind: str, cx: float, cy: float, size: float, angle: float) -> None:
    r = size / 2

    def poly(n: int, radius_fn=lambda k: r, offset: float = 0.0):
        pts = []
        for k in range(n):
            a = angle + offset + 2 * np.pi * k / n
            pts.append((cx + radius_fn(k) * np.cos(a), cy + radius_fn(k) * np.sin(a)))
        draw.polygon(pts, fill=255)

    if kind == "disc":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
    elif kind == "rectangle":
        draw.rectangle([cx - r, cy - 0.6 * r, cx + r, cy + 0.6 * r], fill=255)
    elif kind == "triangle":
        poly(3)
    elif kind == "ring":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
        draw.ellipse([cx - 0.5 * r, cy - 0.5 * r, cx + 0.5 * r, cy + 0.5 * r], fill=0)
    elif kind == "cross":
        w = 0.35 * r
        draw.rectangle([cx - r, cy - w, cx + r, cy + w], fill=255)
        draw.rectangle([cx - w, cy - r, cx + w, cy + r], fill=255)
    elif kind == "diamond":
        poly(4, radius_fn=lambda k: r if k % 2 == 0 else 0.6 * r)
    elif kind == "ellipse":
        draw.ellipse([cx - r, cy - 0.5 * r, cx + r, cy + 0.5 * r], fill=255)
    elif kind == "star":
        poly(10, radius_fn=lambda k: r if k % 2 == 0 else 0.45 * r)
    else:  # pragma: no cover - SHAPES is closed
        raise ValueError(kind)
