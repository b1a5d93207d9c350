"""Bilinear upsampling by 16 of MLA-sized logits, forward + backward: ``setr.models.resize.resize`` (matrix
products) against ``F.interpolate`` (atomic-add backward on CUDA), in one process (not a test).

    python benchmarks/resize_vs_interpolate.py                          # CUDA when there is one, else the CPU
    python benchmarks/resize_vs_interpolate.py --device cpu --batch 2 --size 16

Each case: ``--warmup`` untimed calls, then the mean of ``--steps`` calls of ``fn(x).float().sum().backward()``
(CUDA events on CUDA, ``time.perf_counter`` on the CPU). Prints one line per dtype and, last, one JSON line:
``{"device", "gpu", "shape", "scale", "cases": {dtype: {"interpolate_ms", "resize_ms", "ratio"}}}`` (ratio:
interpolate / resize, > 1: resize is faster). Record it with ``benchmarks/record.py``.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

from setr.models.resize import resize


def mean_ms(fn, x: torch.Tensor, steps: int, warmup: int) -> float:
    """Mean ms of ``fn(x).float().sum().backward()`` over ``steps`` calls after ``warmup``."""
    for _ in range(warmup):
        fn(x).float().sum().backward()
    if x.device.type == "cuda":
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(steps):
            fn(x).float().sum().backward()
        b.record()
        torch.cuda.synchronize()
        return a.elapsed_time(b) / steps
    t0 = time.perf_counter()
    for _ in range(steps):
        fn(x).float().sum().backward()
    return (time.perf_counter() - t0) * 1e3 / steps


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--classes", type=int, default=150)
    p.add_argument("--size", type=int, default=32, help="the logits' height and width")
    p.add_argument("--scale", type=int, default=16)
    p.add_argument("--dtypes", default="bfloat16,float32")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    args = p.parse_args(argv)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else "cpu" if args.device == "auto" else args.device)
    shape = [args.batch, args.classes, args.size, args.size]
    cases = {}
    for name in args.dtypes.split(","):
        dt = getattr(torch, name)
        x = torch.randn(*shape, device=device, dtype=dt, requires_grad=True)
        t0 = mean_ms(lambda x: F.interpolate(x, scale_factor=args.scale, mode="bilinear", align_corners=False), x,
                     args.steps, args.warmup)
        t1 = mean_ms(lambda x: resize(x, scale_factor=args.scale), x, args.steps, args.warmup)
        cases[name] = {"interpolate_ms": round(t0, 3), "resize_ms": round(t1, 3), "ratio": round(t0 / t1, 3)}
        print(f"{name}: {'x'.join(map(str, shape))} -> x{args.scale} forward+backward: F.interpolate {t0:.2f} ms, "
              f"resize {t1:.2f} ms, {t0 / t1:.1f}x", flush=True)
    out = {"device": device.type, "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
           "shape": shape, "scale": args.scale, "cases": cases}
    print(json.dumps(out), flush=True)
    return out


if __name__ == "__main__":
    main()
