"""Time and peak memory of the training loss path, reference vs fused, forward + backward (not a test).

reference: what ``model.loss_path=reference`` computes per head: the logits resized to the label
(``setr.models.resize.resize``), upcast to float32, ``F.cross_entropy``. fused:
``setr.models.seg_loss.upsampled_cross_entropy`` on the low-resolution logits. Prints one JSON line.

    .venv/bin/python benchmarks/loss_path.py                      # B=2, C=150, 32x32 -> 512x512, CPU
    .venv/bin/python benchmarks/loss_path.py --device cuda --dtype bfloat16 --batch 8

Peak memory of one forward + backward above what was held before it, each path in a fresh process: on CUDA
``torch.cuda.max_memory_allocated``; on CPU the process's resident set sampled every 2 ms
(``setr.benchmark.train.PeakMemory``).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from setr.benchmark.train import PeakMemory
from setr.models.resize import resize
from setr.models.seg_loss import upsampled_cross_entropy


def reference(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(resize(x, size=tuple(t.shape[-2:])).float(), t, ignore_index=255)


def fused(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return upsampled_cross_entropy(x, t, ignore_index=255)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_mb(fn, x, t, device: torch.device) -> float:
    """Peak memory of one forward + backward above what was held before it, in MiB: CUDA, the allocator's peak;
    CPU, the process's resident set sampled every 2 ms (setr.benchmark.train.PeakMemory), less its size before."""
    gc.collect()
    with PeakMemory(device) as mem:
        start = mem._rss
        fn(x, t).backward()
    return mem.peak_mb if device.type == "cuda" else mem.peak_mb - start / 2**20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--classes", type=int, default=150)
    ap.add_argument("--low", type=int, default=32)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--peak-of", choices=("reference", "fused"), help=argparse.SUPPRESS)  # the child's job
    args = ap.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    if args.threads:
        torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, args.classes, args.low, args.low, generator=gen).to(device, dtype).requires_grad_()
    t = torch.randint(0, args.classes, (args.batch, args.size, args.size), generator=gen)
    t[:, : args.size // 8] = 255  # some ignored pixels, as the crop padding gives
    t = t.to(device)
    result: dict = {"batch": args.batch, "classes": args.classes, "low": args.low, "size": args.size,
                    "dtype": args.dtype, "device": str(device), "torch": torch.__version__,
                    "threads": torch.get_num_threads(), "load_avg_1min": os.getloadavg()[0]}
    if device.type == "cuda":
        result["gpu"] = torch.cuda.get_device_name(device)
    paths = {"reference": reference, "fused": fused}
    if args.peak_of:  # a fresh process measures one path's peak (memory the allocator kept from another is no help)
        print(json.dumps({"peak_mb": round(peak_mb(paths[args.peak_of], x, t, device), 1)}))
        return
    losses, grads = {}, {}
    for name, fn in paths.items():  # warm-up, and the values compared
        x.grad = None
        loss = fn(x, t)
        loss.backward()
        losses[name], grads[name] = loss.detach().float(), x.grad.detach().float().clone()
    times: dict[str, list[float]] = {name: [] for name in paths}
    for _ in range(args.repeats):  # interleaved: a load that comes and goes weighs on both alike
        for name, fn in paths.items():
            x.grad = None
            sync(device)
            t0 = time.perf_counter()
            fn(x, t).backward()
            sync(device)
            times[name].append(time.perf_counter() - t0)
    x.grad = None
    for name in paths:
        child = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--peak-of", name], check=True,
                               capture_output=True, text=True)
        result[name] = {"ms": round(1000 * statistics.median(times[name]), 2),
                        "peak_mb": json.loads(child.stdout.strip().splitlines()[-1])["peak_mb"]}
    result["speedup"] = round(result["reference"]["ms"] / result["fused"]["ms"], 2)
    result["memory_ratio"] = round(result["reference"]["peak_mb"] / max(result["fused"]["peak_mb"], 1e-9), 1)
    result["max_abs_diff_loss"] = float((losses["fused"] - losses["reference"]).abs())
    result["max_abs_diff_grad"] = float((grads["fused"] - grads["reference"]).abs().max())
    print(json.dumps(result))


if __name__ == "__main__":
    main()
