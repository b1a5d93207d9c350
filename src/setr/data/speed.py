"""How fast one data-loading worker runs a dataset's training pipeline (issue 11: the augmentations must never
starve the GPUs).

:func:`pipeline_throughput` writes a few fake sample files of the real size and format (ADE20K: a ~683x512 JPEG
and a PNG label; Cityscapes: a 2048x1024 PNG and a ``*_gtFine_labelIds.png``), reads them through the dataset
class's own ``load`` (decode + label mapping, as training does) and runs the configured train pipeline on them in
this process: images per second of one worker, and the milliseconds of every step. A DataLoader with ``N``
workers delivers about ``N`` times that (while there are free cores).

    python -m setr.data.speed ade20k cityscapes --num-images 50 [--crop 512] [--image-size 683x512] [--seed 0]

It prints one human-readable line per dataset and, as its last stdout line, one JSON object: the settings measured
(``workers``: 1, ``num_images``, ``seed``, ``crop``, ``image_size_hw``, ``overrides``), ``images_per_s_per_worker``
by dataset, and ``datasets``: per dataset its ``crop_size``, ``image_size_hw`` (of the fake source files),
``output_shape``, ``images_per_s``, ``ms_per_image`` and ``steps_ms``; ``benchmarks/record.py`` keeps it with its
provenance. Bad arguments end in one line (exit status 2).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

from setr.data.base import SegDataset
from setr.errors import SETRConfigError
from setr.values import positive_int

# (height, width) of a typical image of each dataset (ADE20K's are ~683x512 on average; Cityscapes' all 2048x1024)
DEFAULT_SIZES = {"ade20k": (512, 683), "cityscapes": (1024, 2048)}


def _fake_image(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A smooth colour field with some texture: compresses (and decodes) like a photo, unlike white noise."""
    low = rng.integers(0, 256, (max(2, h // 32), max(2, w // 32), 3)).astype(np.uint8)
    img = cv2.resize(low, (w, h), interpolation=cv2.INTER_CUBIC).astype(np.int16)
    img += rng.integers(-12, 13, (h, w, 3), dtype=np.int16)
    return np.clip(img, 0, 255).astype(np.uint8)


def _fake_labels(rng: np.random.Generator, h: int, w: int, values: Sequence[int]) -> np.ndarray:
    """Blocky regions of a dozen of ``values`` (a few large segments per image, as real label maps)."""
    chosen = rng.choice(np.asarray(values), size=min(12, len(values)), replace=False)
    low = rng.choice(chosen, size=(max(2, h // 64), max(2, w // 64))).astype(np.uint8)
    return cv2.resize(low, (w, h), interpolation=cv2.INTER_NEAREST)


class _Files(SegDataset):
    """A dataset over given files with the ``map_labels`` / class names of ``cls`` (for generic configs)."""


def _layout(name: str, root: Path, i: int, num_classes: int) -> tuple[Path, Path, Sequence[int], str]:
    """Where sample ``i`` goes, its raw label values and the image format."""
    if name == "ade20k":
        return (root / f"ADE_train_{i:08d}.jpg", root / f"ADE_train_{i:08d}.png", range(0, 151), ".jpg")
    if name == "cityscapes":
        return (root / f"c_{i:06d}_000019_leftImg8bit.png", root / f"c_{i:06d}_000019_gtFine_labelIds.png",
                range(0, 34), ".png")
    return root / f"{i:06d}.jpg", root / f"{i:06d}.png", range(0, num_classes), ".jpg"


def _make_dataset(data_cfg: Mapping, root: Path, size: tuple[int, int], n_files: int, seed: int) -> SegDataset:
    from setr.data.registry import DATASETS

    name = str(data_cfg.get("name"))
    num_classes = int(data_cfg.get("num_classes") or 2)
    rng = np.random.default_rng(seed)
    samples = []
    for i in range(n_files):
        img_path, mask_path, values, _ = _layout(name, root, i, num_classes)
        image = _fake_image(rng, *size)
        params = [cv2.IMWRITE_JPEG_QUALITY, 90] if img_path.suffix == ".jpg" else []
        cv2.imwrite(str(img_path), cv2.cvtColor(image, cv2.COLOR_RGB2BGR), params)
        cv2.imwrite(str(mask_path), _fake_labels(rng, *size, values))
        samples.append((img_path, mask_path))
    cls = DATASETS.get(name)
    if cls is not None and cls.load is SegDataset.load and name in DEFAULT_SIZES:
        ds = cls.__new__(cls)  # the real class (its label mapping), over the fake files
        SegDataset.__init__(ds)
    else:
        ds = _Files()
        ds.class_names = [str(c) for c in range(num_classes)]
    ds.samples = samples
    return ds


def _steps(data_cfg: Mapping, seed: int):
    from setr.data.transforms import build_pipeline

    pipeline = build_pipeline(data_cfg.get("train_pipeline"), data_cfg["mean"], data_cfg["std"], seed=seed)
    return pipeline, list(pipeline.transforms)


def _name(t: Any, seen: dict[str, int]) -> str:
    base = type(t).__name__
    seen[base] = seen.get(base, 0) + 1
    return base if seen[base] == 1 else f"{base}_{seen[base]}"


def pipeline_throughput(data_cfg: Mapping, num_images: int = 50, image_size: tuple[int, int] | None = None,
                        seed: int = 0) -> dict:
    """Images per second of one worker (this process, no DataLoader) for ``data_cfg``'s train pipeline.

    Args:
        data_cfg: a ``data`` config (``conf/data/*.yaml``, interpolations resolved): ``name``, ``num_classes``,
            ``mean``, ``std``, ``train_pipeline``.
        num_images: samples timed (after two warm-up samples); they cycle over 4 fake files.
        image_size: ``(height, width)`` of the fake files; default the dataset's typical size
            (:data:`DEFAULT_SIZES`; other datasets: ``4/3 x crop_size`` by ``crop_size``).
        seed: seeds the fake files and the augmentation draws.

    Returns:
        ``images_per_s`` and ``ms_per_image`` (``load`` + the whole ``Compose``, as a worker runs it),
        ``steps``: milliseconds per image of ``decode`` (reading and label mapping) and of every transform of the
        pipeline run one by one (names as their classes, ``_2`` for a repeat), ``num_images``, ``image_size``,
        ``crop_size``, ``output_shape``.
    """
    data_cfg = dict(data_cfg)
    name = str(data_cfg.get("name"))
    if image_size is None:
        crop = int(data_cfg.get("crop_size") or 512)
        image_size = DEFAULT_SIZES.get(name, (crop, crop * 4 // 3))
    size = (int(image_size[0]), int(image_size[1]))
    num_images = max(1, int(num_images))
    torch_threads, cv2_threads = torch.get_num_threads(), cv2.getNumThreads()
    # as in a DataLoader worker, where PyTorch runs on one thread. OpenCV is held to one thread here too, so that
    # the figure is one core's; never call cv2.setNumThreads in a forked worker: it deadlocks there.
    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    try:
        return _measure(data_cfg, name, num_images, size, seed)
    finally:
        torch.set_num_threads(torch_threads)
        cv2.setNumThreads(cv2_threads)


def _measure(data_cfg: dict, name: str, num_images: int, size: tuple[int, int], seed: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="setr_speed_") as tmp:
        ds = _make_dataset(data_cfg, Path(tmp), size, 4, seed)
        pipeline, transforms = _steps(data_cfg, seed)
        ds.transform = pipeline
        n_files = len(ds.samples)
        for i in range(2):  # warm-up: imports, first-call allocations
            ds[(i % n_files, seed + i)]
        # 1. the whole path as a worker runs it
        t0 = time.perf_counter()
        for i in range(num_images):
            out = ds[(i % n_files, seed + i)]
        total = time.perf_counter() - t0
        # 2. per step: decode, then every transform on its own (same draws as the Compose: seeded alike)
        steps: dict[str, float] = {"decode": 0.0}
        seen: dict[str, int] = {}
        names = [_name(t, seen) for t in transforms]
        steps.update(dict.fromkeys(names, 0.0))
        for i in range(num_images):
            t = time.perf_counter()
            image, mask = ds.load(i % n_files)
            mask = mask.astype(np.uint8) if mask.dtype != np.uint8 and mask.max(initial=0) <= 255 else mask
            steps["decode"] += time.perf_counter() - t
            pipeline.set_random_seed(seed + i)
            data: dict[str, Any] = {"image": image, "mask": mask}
            for step, n in zip(transforms, names):
                t = time.perf_counter()
                data = step(**data)
                steps[n] += time.perf_counter() - t
    ms = {k: round(v / num_images * 1000.0, 3) for k, v in steps.items()}
    return {
        "dataset": name,
        "images_per_s": num_images / total,
        "ms_per_image": total / num_images * 1000.0,
        "steps": ms,
        "num_images": num_images,
        "image_size": size,
        "crop_size": data_cfg.get("crop_size"),
        "output_shape": tuple(out["image"].shape),
    }


def load_data_cfg(name: str, overrides: Sequence[str] = ()) -> dict:
    """``conf/data/<name>.yaml`` composed with Hydra (interpolations resolved), as a plain dict."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from setr.paths import conf_dir

    with initialize_config_dir(config_dir=str(conf_dir()), version_base=None):
        cfg = compose(config_name="train", overrides=[f"data={name}", *overrides])
    return OmegaConf.to_container(cfg.data, resolve=True)


def _at_least(minimum: int):
    """An argparse type: an integer ``>= minimum``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text!r}")
        return value

    return parse


def _image_size(text: str) -> tuple[int, int]:
    """``WIDTHxHEIGHT`` (e.g. ``683x512``, as the lines print it) as ``(height, width)``."""
    parts = text.lower().split("x")
    try:
        w, h = (int(p) for p in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT, e.g. 683x512, got {text!r}") from None
    if h < 1 or w < 1:
        raise argparse.ArgumentTypeError(f"sizes must be >= 1, got {text!r}")
    return h, w


class _Parser(argparse.ArgumentParser):
    """argparse whose mistakes end in one line (the usage stays behind ``--help``)."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (--help for usage)\n")


def parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m setr.data.speed",
                description="Images/s of one data-loading worker running each dataset's train pipeline on fake "
                            "files of its real size and format; the last stdout line is one JSON object "
                            "(benchmarks/record.py keeps it).")
    p.add_argument("datasets", nargs="*", default=["ade20k", "cityscapes"], metavar="DATASET",
                   help="data configs (conf/data/<DATASET>.yaml) to measure (default: ade20k cityscapes)")
    p.add_argument("--num-images", type=_at_least(1), default=50, help="samples timed per dataset (default 50)")
    p.add_argument("--seed", type=_at_least(0), default=0,
                   help="seeds the fake files and the augmentations (default 0)")
    p.add_argument("--crop", type=_at_least(1), default=None, metavar="N",
                   help="crop size (data.crop_size=N; default: each config's)")
    p.add_argument("--image-size", type=_image_size, default=None, metavar="WxH",
                   help="size of the fake source images, e.g. 683x512 (default: each dataset's typical size)")
    p.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                   help="a Hydra override of the composed config, e.g. data.num_classes=5 (repeatable)")
    return p


def _config(name: str, overrides: Sequence[str]) -> dict:
    """``load_data_cfg`` with its failures as one :class:`SETRConfigError` line naming the dataset."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from setr.paths import conf_dir

    known = sorted(f.stem for f in (conf_dir() / "data").glob("*.yaml"))
    if name not in known:
        raise SETRConfigError(f"dataset {name!r}: no conf/data/{name}.yaml; choose from {', '.join(known)}")
    try:
        cfg = load_data_cfg(name, overrides)
    except (HydraException, OmegaConfBaseException) as e:
        why = " ".join(str(e).split("\n")[0].split())
        hint = " (set it with --override KEY=VALUE)" if "Missing mandatory value" in why else ""
        raise SETRConfigError(f"dataset {name!r} with overrides {list(overrides)}: {why}{hint}") from None
    if cfg.get("crop_size") is not None:
        positive_int(cfg["crop_size"], "data.crop_size")
    if not isinstance(cfg.get("train_pipeline"), list):
        raise SETRConfigError(f"data.train_pipeline: expected a list of steps, got {cfg.get('train_pipeline')!r}")
    return cfg


def run(args: argparse.Namespace) -> dict:
    """Measure every dataset of ``args``; prints the human-readable lines and returns the JSON line's object."""
    overrides = [*([f"data.crop_size={args.crop}"] if args.crop is not None else []), *args.override]
    results = []
    for name in args.datasets:
        r = pipeline_throughput(_config(name, overrides), num_images=args.num_images, image_size=args.image_size,
                                seed=args.seed)
        steps = "  ".join(f"{k} {v:.2f}" for k, v in r["steps"].items())
        print(f"{name}: {r['images_per_s']:.1f} images/s per worker ({r['ms_per_image']:.2f} ms/image; "
              f"{r['image_size'][1]}x{r['image_size'][0]} -> {r['output_shape']})\n  ms: {steps}", flush=True)
        results.append({
            "dataset": name,
            "crop_size": r["crop_size"],
            "image_size_hw": list(r["image_size"]),
            "output_shape": list(r["output_shape"]),
            "images_per_s": round(r["images_per_s"], 3),
            "ms_per_image": round(r["ms_per_image"], 3),
            "steps_ms": r["steps"],
        })
    return {
        "benchmark": "data_speed",
        "device": "cpu",  # the data pipeline runs on the CPU (record.py: the CPU model is the device)
        "workers": 1,  # one worker: this process, no DataLoader; N workers give about N x (while cores are free)
        "threads_per_worker": 1,
        "num_images": args.num_images,
        "seed": args.seed,
        "crop": args.crop,
        "image_size_hw": list(args.image_size) if args.image_size else None,
        "overrides": overrides,
        "images_per_s_per_worker": {r["dataset"]: r["images_per_s"] for r in results},
        "datasets": results,
    }


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        out = run(args)
    except SETRConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    sys.stderr.flush()
    print(json.dumps(out), flush=True)  # the final stdout line: one JSON object (benchmarks/record.py keeps it)
    return 0


if __name__ == "__main__":
    sys.exit(main())
