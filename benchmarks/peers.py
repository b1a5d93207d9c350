"""This project's SETR against mmsegmentation 1.2.2's own SETR, side by side in one process (not a test).

Both networks are built from their ADE20K configs (mmseg: ``configs/setr/<--config>.py`` as shipped in its
wheel; this project: the same network converted from mmseg's weights by ``setr.checkpoint.convert_state_dict``,
the code behind ``setr-convert``), so they hold the same weights; their eval logits on one image are checked
equal (fp32) before anything is timed. Rounds are interleaved (mmseg, setr, mmseg, setr, ...), and each figure
is the median over rounds.

Measured per implementation and precision:
- training images/s: one step from a normalised batch on the device to the optimizer step (forward with the
  auxiliary heads, every head's loss against the full-resolution label, backward, SGD step). mmseg:
  ``model.loss`` + ``parse_losses`` + its ``OptimWrapper`` (``AmpOptimWrapper`` with dynamic loss scale for
  ``amp``: what ``tools/train.py --amp`` gives its users; it needs a GPU). This project: the same step as
  ``src/bench.py`` (``SETRModule.compute_loss``), under ``--ours-amp`` (default bf16-mixed) for ``amp``;
- peak memory of a training round (CUDA only: the allocator's peak plus what the model holds);
- inference images/s, whole (one forward at the crop) and slide (``--image`` with the ADE20K window and stride;
  mmseg one window per forward, this project as its ADE20K config says).

Needs mmsegmentation, mmengine and mmcv(-lite) importable: ``make peers`` installs them offline from
``benchmarks/peers/wheels`` into ``benchmarks/peers/site`` (this script puts that folder on ``sys.path``); see
benchmarks/README.md. Prints a table and, last, one JSON line (``benchmarks/record.py`` records it):

    .venv/bin/python benchmarks/peers.py --encoder vit_b --crop 256 --batch 2           # CPU, fp32
    .venv/bin/python benchmarks/peers.py --config setr_vit-l_mla_8xb2-160k_ade20k-512x512 --device cuda
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import statistics
import sys
import types
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
SITE = Path(os.environ.get("SETR_PEERS_SITE", HERE / "peers" / "site"))
CONFIGS = ("setr_vit-l-mla_8xb1-160k_ade20k-512x512", "setr_vit-l_mla_8xb2-160k_ade20k-512x512",
           "setr_vit-l_pup_8xb2-160k_ade20k-512x512", "setr_vit-l_naive_8xb2-160k_ade20k-512x512")
# ViT-B/16 (12 blocks) in place of the configs' ViT-L/16 (24 blocks): the configs' blocks, scaled
ENCODERS = {"vit_l": {"embed_dims": 1024, "num_layers": 24, "num_heads": 16},
            "vit_b": {"embed_dims": 768, "num_layers": 12, "num_heads": 12},
            "vit_t": {"embed_dims": 192, "num_layers": 12, "num_heads": 3}}  # the tests' quick check


def fail(msg: str) -> None:
    print(f"error: {msg}", file=sys.stderr)
    raise SystemExit(2)


def import_mmseg() -> dict[str, str]:
    """Import mmsegmentation (from ``benchmarks/peers/site`` when it is there) and return the versions. mmcv-lite
    (mmcv built without its compiled ops, see benchmarks/README.md) lacks ``mmcv.ops``; mmseg imports a few of
    them at import time (point_sample, sigmoid_focal_loss, ...) for heads and losses SETR does not use, so they
    are stood in by functions that raise if they are ever called: a timed SETR step never calls one."""
    if SITE.is_dir() and str(SITE) not in sys.path:
        sys.path.insert(0, str(SITE))
    try:
        import mmcv
        import mmengine
    except ImportError as e:
        fail(f"{e}: mmsegmentation 1.2.2 is not installed; run `make peers` (offline, from benchmarks/peers/wheels)")
    try:
        import mmcv._ext
    except ImportError:
        ops = types.ModuleType("mmcv.ops")

        def missing(name: str):
            def op(*args: Any, **kwargs: Any) -> Any:
                raise RuntimeError(f"mmcv.ops.{name}: not built (mmcv-lite); SETR never calls it")
            return op

        def attr(name: str) -> Any:
            if name.startswith("__"):
                raise AttributeError(name)
            return missing(name)

        ops.__getattr__ = attr  # type: ignore[attr-defined]
        ops.__path__ = []  # a package: `from mmcv.ops.x import y` fails with ImportError, as mmcv-lite's would
        sys.modules["mmcv.ops"] = ops
    import mmseg
    from mmseg.utils import register_all_modules

    register_all_modules(init_default_scope=True)
    from mmengine.logging import MMLogger

    MMLogger.get_current_instance().setLevel(logging.WARNING)  # init_weights' per-parameter lines
    return {"mmseg": mmseg.__version__, "mmcv": mmcv.__version__, "mmengine": mmengine.__version__}


def mmseg_config(name: str, encoder: str, crop: int):
    """mmseg's config ``name`` from its package, for random weights (no pretrained file), single-process BN in
    place of SyncBN (mmengine's ``revert_sync_batchnorm`` does the same to a built model), ``crop`` and
    ``encoder``'s width and depth (the blocks the heads read scaled with the depth)."""
    import mmseg
    from mmengine.config import Config

    path = Path(mmseg.__file__).parent / ".mim" / "configs" / "setr" / f"{name}.py"
    if not path.is_file():
        fail(f"--config {name}: no such config in mmseg's package ({path.parent})")
    cfg = Config.fromfile(str(path))
    model = cfg.model
    model.pretrained = None
    bb = model.backbone
    bb.init_cfg = None
    bb.img_size = (crop, crop)
    arch = ENCODERS[encoder]
    depth0, width0 = bb.num_layers, bb.embed_dims
    bb.update(arch)
    bb.out_indices = tuple(round((i + 1) * arch["num_layers"] / depth0) - 1 for i in bb.out_indices)
    model.data_preprocessor.size = (crop, crop)

    def fix(node: Any) -> None:
        if isinstance(node, dict):
            if node.get("type") == "SyncBN":
                node["type"] = "BN"
            if node.get("in_channels") == width0:
                node["in_channels"] = arch["embed_dims"]
            if isinstance(node.get("in_channels"), (list, tuple)) and set(node["in_channels"]) == {width0}:
                node["in_channels"] = [arch["embed_dims"]] * len(node["in_channels"])
            for v in node.values():
                fix(v)
        elif isinstance(node, (list, tuple)):
            for v in node:
                fix(v)

    fix(model)
    return cfg


class Side:
    """One implementation at one precision: its training step, inference calls and measured values."""

    def __init__(self, impl: str, precision: str) -> None:
        self.impl, self.precision = impl, precision
        self.train = None
        self.infer: dict[str, Any] = {}
        self.results: dict[str, list[float]] = {}
        self.skipped: str | None = None

    @property
    def name(self) -> str:
        return f"{self.impl} {self.precision}"


def mmseg_sides(cfg, precisions: list[str], device: torch.device, batch: int, crop: int, image: tuple[int, int],
                x: torch.Tensor, y: torch.Tensor, xi: torch.Tensor) -> tuple[Any, list[Side]]:
    from mmengine.optim import AmpOptimWrapper, OptimWrapper
    from mmengine.structures import PixelData
    from mmseg.registry import MODELS
    from mmseg.structures import SegDataSample

    torch.manual_seed(0)
    model = MODELS.build(cfg.model)
    model.init_weights()
    model.to(device)
    samples = []
    for i in range(batch):
        s = SegDataSample(metainfo={"img_shape": (crop, crop), "pad_shape": (crop, crop), "ori_shape": (crop, crop)})
        s.gt_sem_seg = PixelData(data=y[i:i + 1])
        samples.append(s)
    sides = []
    for p in precisions:
        side = Side("mmseg", p)
        optim = torch.optim.SGD(model.parameters(), lr=0.001, momentum=0.9, weight_decay=0.0)
        if p == "amp":
            if device.type != "cuda":
                side.skipped = "mmengine's AmpOptimWrapper runs on a GPU only"
                sides.append(side)
                continue
            wrapper = AmpOptimWrapper(optimizer=optim, loss_scale="dynamic")
        else:
            wrapper = OptimWrapper(optimizer=optim)

        def step(wrapper=wrapper) -> None:
            model.train()
            with wrapper.optim_context(model):
                losses = model.loss(x, samples)
            loss, _ = model.parse_losses(losses)
            wrapper.update_params(loss)

        side.train = step
        amp = (lambda: torch.autocast(device.type, dtype=torch.float16)) if p == "amp" else contextlib.nullcontext

        def infer(inp: torch.Tensor, mode: str, amp=amp) -> Any:
            def go() -> None:
                model.eval()
                model.test_cfg.mode = mode
                h, w = inp.shape[-2:]
                metas = [{"ori_shape": (h, w), "img_shape": (h, w), "pad_shape": (h, w), "padding_size": [0] * 4}]
                with torch.no_grad(), amp():
                    model.inference(inp, metas)
            return go

        side.infer = {"whole": infer(x[:1], "whole"), "slide": infer(xi, "slide")}
        sides.append(side)
    model.test_cfg.crop_size = (crop, crop)
    model.test_cfg.stride = (crop * 2 // 3, crop * 2 // 3)
    return model, sides


def our_sides(mm_model, cfg, precisions: list[str], ours_amp: str, device: torch.device, batch: int, crop: int,
              x: torch.Tensor, y: torch.Tensor, xi: torch.Tensor) -> tuple[Any, list[Side], dict[str, Any]]:
    from setr.benchmark.train import train_step_fn
    from setr.benchmark.variant import Variant, autocast, build_variant
    from setr.checkpoint.released import convert_state_dict
    from setr.inference import infer

    bb = cfg.model.backbone
    conv = convert_state_dict(mm_model.state_dict(), num_heads=bb.num_heads, out_indices=list(bb.out_indices),
                              where="mmseg model")
    stride = [crop * 2 // 3] * 2
    data = {"crop_size": crop, "mean": [0.0] * 3, "std": [1.0] * 3, "ignore_index": 255,
            "inference": {"mode": "slide", "crop_size": [crop, crop], "stride": stride, "batch_size": None}}
    sides, first = [], None
    for p in precisions:
        side = Side("setr", p)
        prec = "32-true" if p == "fp32" else ours_amp
        side.precision = f"{p} ({prec})" if p == "amp" else p
        v = Variant(name=side.name, precision=prec, model_cfg=dict(conv.model), fused_attn=None,
                    grad_checkpointing=False, compile=False, data=data,
                    optimizer={"name": "sgd", "lr": 0.001, "momentum": 0.9, "weight_decay": 0.0},
                    slide_batch_size="auto")
        build_variant(v, device, total_steps=10_000)
        v.module.model.load_state_dict(conv.state_dict, strict=True)
        first = first or v
        module = v.module

        def run(inp: torch.Tensor, icfg: dict[str, Any], v=v, module=module) -> Any:
            def go() -> None:
                module.eval()
                with torch.no_grad(), autocast(v, device):
                    infer(module, inp, icfg)
            return go

        side.train = train_step_fn(v, device, batch, (crop, crop), inputs=(x, y))
        side.infer = {"whole": run(x[:1], {"mode": "whole"}), "slide": run(xi, dict(data["inference"]))}
        sides.append(side)
    return first, sides, conv.summary()


def check_equal(mm_model, ours, x: torch.Tensor) -> float:
    """Largest |difference| of the two networks' fp32 eval logits on ``x[:1]``, relative to the largest logit;
    stops the run when it is above 1e-4 (the conversion or the build is wrong, and every ratio with it)."""
    h, w = x.shape[-2:]
    metas = [{"ori_shape": (h, w), "img_shape": (h, w), "pad_shape": (h, w), "padding_size": [0] * 4}]
    mm_model.eval()
    ours.module.eval()
    with torch.no_grad():
        a = mm_model.encode_decode(x[:1], metas).float()
        b = ours.module.model(x[:1])
        b = (b["out"] if isinstance(b, dict) else b).float()
    if a.shape != b.shape:
        fail(f"logits: mmseg {tuple(a.shape)}, this project {tuple(b.shape)}")
    rel = float((a - b).abs().max() / a.abs().max().clamp_min(1e-12))
    if rel > 1e-4:
        fail(f"logits differ (max |diff| / max |logit| = {rel:.2e} > 1e-4): the two networks are not the same")
    return rel


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="setr_vit-l_mla_8xb2-160k_ade20k-512x512", choices=CONFIGS)
    ap.add_argument("--encoder", default="vit_b", choices=sorted(ENCODERS))
    ap.add_argument("--crop", type=int, default=512)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--image", type=int, nargs=2, default=None, metavar=("H", "W"),
                    help="slide inference image (default: crop x 4/3 crop, an ADE20K-shaped image)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--precisions", default=None, help="fp32,amp (default: fp32 on CPU, fp32,amp on CUDA)")
    ap.add_argument("--ours-amp", default="bf16-mixed", choices=("bf16-mixed", "16-mixed"),
                    help="this project's precision in the amp rows (mmseg --amp is float16 + dynamic loss scale)")
    ap.add_argument("--steps", type=int, default=2, help="training steps / inference images timed per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--no-inference", action="store_true")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        fail("--device cuda: no CUDA device here")
    precisions = (args.precisions or ("fp32,amp" if device.type == "cuda" else "fp32")).split(",")
    if any(p not in ("fp32", "amp") for p in precisions):
        fail(f"--precisions {args.precisions}: expected fp32 and/or amp")
    for name in ("crop", "batch", "steps", "rounds"):
        if getattr(args, name) < 1:
            fail(f"--{name}: must be >= 1")
    if args.crop % 16:
        fail(f"--crop {args.crop}: must be a multiple of 16 (the patch size)")
    image = tuple(args.image) if args.image else (args.crop, args.crop * 4 // 3)

    versions = import_mmseg()
    cfg = mmseg_config(args.config, args.encoder, args.crop)
    n = int(cfg.model.decode_head.num_classes)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, 3, args.crop, args.crop, generator=gen).to(device)
    y = torch.randint(0, n, (args.batch, args.crop, args.crop), generator=gen).to(device)
    xi = torch.randn(1, 3, *image, generator=gen).to(device)

    mm_model, mm = mmseg_sides(cfg, precisions, device, args.batch, args.crop, image, x, y, xi)
    first, ours, converted = our_sides(mm_model, cfg, precisions, args.ours_amp, device, args.batch, args.crop,
                                       x, y, xi)
    rel = check_equal(mm_model, first, x)
    print(f"same network: {converted['head']} {args.encoder} {args.crop}, {n} classes, out_indices "
          f"{converted['out_indices']}; fp32 logits max |diff| / max |logit| = {rel:.1e}", flush=True)

    from setr.benchmark.timing import timed, warm_up
    from setr.benchmark.train import PeakMemory

    sides = [s for pair in zip(mm, ours) for s in pair if s.skipped is None]
    fns = [s.train for s in sides] + ([] if args.no_inference else [f for s in sides for f in s.infer.values()])
    warm_up(fns, args.warmup, device)
    for r in range(args.rounds):
        for s in sides:
            with PeakMemory(device, 0) as mem:
                sec = timed(s.train, args.steps, device)
            s.results.setdefault("train_images_per_s", []).append(args.batch / sec)
            if device.type == "cuda":
                s.results.setdefault("train_peak_mem_mb", []).append(mem.peak_mb)
            if not args.no_inference:
                for mode, fn in s.infer.items():
                    s.results.setdefault(f"{mode}_images_per_s", []).append(1 / timed(fn, args.steps, device))
        print(f"round {r + 1}/{args.rounds}: " + ", ".join(
            f"{s.name} {s.results['train_images_per_s'][-1]:.2f} img/s" for s in sides), flush=True)

    rows = []
    for s in mm + ours:
        row: dict[str, Any] = {"impl": s.impl, "precision": s.precision}
        if s.skipped:
            row["skipped"] = s.skipped
        for k, vals in s.results.items():
            row[k] = {"median": statistics.median(vals), "min": min(vals)}
        rows.append(row)
    ratios = {}
    for a, b in zip(mm, ours):
        if a.skipped or b.skipped:
            continue
        key = a.precision
        ratios[key] = {k: b.results[k] and statistics.median(b.results[k]) / statistics.median(a.results[k])
                       for k in a.results if k.endswith("_per_s")}
        if "train_peak_mem_mb" in a.results:
            ratios[key]["train_peak_mem_mb"] = (statistics.median(a.results["train_peak_mem_mb"])
                                                / statistics.median(b.results["train_peak_mem_mb"]))

    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{args.config} ({args.encoder}, crop {args.crop}, batch {args.batch}, {device.type}); "
                        "median of rounds; ratio > 1: this project better")
    cols = ["train_images_per_s", "train_peak_mem_mb", "whole_images_per_s", "slide_images_per_s"]
    table.add_column("implementation")
    for c in cols:
        table.add_column(c.replace("_", " "), justify="right")
    for row in rows:
        table.add_row(f"{row['impl']} {row['precision']}", *(
            row["skipped"] if row.get("skipped") and i == 0 else
            (f"{row[c]['median']:.2f}" if c in row else "-") for i, c in enumerate(cols)))
    for key, rat in ratios.items():
        table.add_row(f"ratio {key}", *(f"{rat[c]:.2f}x" if c in rat else "-" for c in cols))
    Console(width=160).print(table)
    out = {"bench": "peers", "peer": f"mmsegmentation {versions['mmseg']}", "config": args.config,
           "encoder": args.encoder, "crop": args.crop, "batch": args.batch, "image": list(image),
           "device": device.type, "steps_per_round": args.steps, "rounds": args.rounds, "head": converted["head"],
           "out_indices": converted["out_indices"], "logits_rel_diff": rel, "versions": versions, "rows": rows,
           "ratio": ratios}
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
