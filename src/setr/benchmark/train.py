"""Training-step throughput and memory: a full step (forward with the auxiliary heads,
:meth:`SETRModule.compute_loss`, backward, optimizer step, LR schedule) on a fixed random batch, and the peak
memory of a round of them."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import torch

from setr.benchmark.timing import sync, timed
from setr.benchmark.variant import Variant, autocast


def train_step_fn(v: Variant, device: torch.device, batch: int, crop: tuple[int, int],
                  inputs: tuple[torch.Tensor, torch.Tensor] | None = None) -> Callable[[], None]:
    """One full training step of the built ``v`` on a fixed random batch of ``batch`` x ``crop``, or on
    ``inputs`` (images, labels) when given (a peer's step timed on the same batch)."""
    if inputs is None:
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(batch, 3, *crop, generator=gen).to(device)
        y = torch.randint(0, v.model_cfg["num_classes"], (batch, *crop), generator=gen).to(device)
    else:
        x, y = inputs
    if v.precision == "bf16-true":
        x = x.to(torch.bfloat16)
    module, optim, sched, scaler = v.module, v.optim, v.sched, v.scaler

    def step() -> None:
        module.train()
        optim.zero_grad(set_to_none=True)
        with autocast(v, device):
            outputs = module(x)
            loss, _ = module.compute_loss(outputs, y)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optim)
            scaler.update()
        else:
            loss.backward()
            optim.step()
        sched.step()

    return step


def resident_bytes(v: Variant) -> int:
    """Bytes the built ``v`` holds between steps: parameters, buffers, gradients, optimizer state (each tensor
    once)."""
    seen: set[int] = set()
    total = 0

    def add(t: Any) -> None:
        nonlocal total
        if isinstance(t, torch.Tensor) and t.device.type != "meta" and id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()

    for p in v.module.parameters():
        add(p)
        add(p.grad)
    for b in v.module.buffers():
        add(b)
    for state in v.optim.state.values():
        for t in state.values():
            add(t)
    return total


class PeakMemory:
    """Peak memory of a block, in ``peak_mb`` after it. CUDA: ``resident`` bytes (what the variant holds) plus the
    block's peak above what was allocated when it began (``torch.cuda.max_memory_allocated``). Other devices: the
    process's peak RSS, sampled every 2 ms (everything resident counts, so an upper bound)."""

    def __init__(self, device: torch.device, resident: int = 0) -> None:
        self.device, self.resident, self.peak_mb = device, resident, float("nan")
        self._stop = threading.Event()
        self._rss = 0

    def _rss_now(self) -> int:
        try:
            import psutil  # not a dependency of the package: resource's lifetime peak stands in without it

            return int(psutil.Process().memory_info().rss)
        except ImportError:
            import resource

            return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # KiB on Linux

    def _sample(self) -> None:
        while not self._stop.wait(0.002):
            self._rss = max(self._rss, self._rss_now())

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            sync(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self._rss = self._rss_now()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.device.type == "cuda":
            sync(self.device)
            peak = torch.cuda.max_memory_allocated(self.device) - self._base + self.resident
        else:
            self._stop.set()
            self._thread.join()
            peak = max(self._rss, self._rss_now())
        self.peak_mb = peak / 2**20


def train_round(v: Variant, step: Callable[[], None], steps: int, batch: int, device: torch.device) -> None:
    """Time ``steps`` training steps of ``v`` and append ``train_steps_per_s``, ``train_images_per_s`` and
    ``train_peak_mem_mb`` to ``v.results``."""
    with PeakMemory(device, resident_bytes(v) if device.type == "cuda" else 0) as mem:
        sec = timed(step, steps, device)
    v.results.setdefault("train_steps_per_s", []).append(1 / sec)
    v.results.setdefault("train_images_per_s", []).append(batch / sec)
    v.results.setdefault("train_peak_mem_mb", []).append(mem.peak_mb)
