"""``src/bench.py``: the speed of the configured setting against a baseline, measured in one process.

Two variants are built from the composed config: the **setting** (the config as given) and the **baseline** (a
copy with ``bench.baseline`` merged on top: fp32, math attention, no gradient checkpointing, no compile,
``F.interpolate`` resizing, NCHW heads, one sliding window per forward). After ``bench.warmup`` steps of every
measure, ``bench.rounds`` rounds run interleaved (setting, baseline, setting, baseline, ...), each timing
``bench.steps_per_round`` steps of:

* ``train_*``: a full training step on random inputs at ``data.batch_size`` x the crop: forward with the
  auxiliary heads, :meth:`SETRModule.compute_loss`, backward, optimizer step (``optimizer`` node) and LR schedule;
  ``train_peak_mem_mb``: CUDA: what the variant holds (weights, gradients, optimizer state) plus the step's peak
  above it (``torch.cuda.max_memory_allocated``); CPU: the process's peak RSS during the round (both variants are
  resident, so this is an upper bound, not a per-variant number);
* ``whole`` / ``slide`` / ``ms_flip``: images/s of :func:`setr.inference.infer` on one image of ``bench.image_size``
  (default the data config's ``test_scale`` as [short, long]): one forward; sliding windows of
  ``data.inference.crop_size`` / ``stride`` (default: the crop and 2/3 of it) with ``data.inference.batch_size``
  windows per forward; the official multi-scale + flip protocol (``data.ms_ratios``, flip, ``test_scale``,
  ``ms_min_short``, probabilities averaged) in the data config's mode.

Then ``data_images_per_s_per_worker`` (:func:`setr.data.speed.pipeline_throughput`, the train pipeline in one
process) and ``workers_per_gpu``: workers needed to feed the measured training images/s. On CUDA, ``mfu``: the
FLOPs of a training step (3 x the training-mode forward FLOPs of :func:`setr.models.summary.count_flops`, attention
counted via the math path on meta tensors, so also when fused; gradient checkpointing's recomputation not counted)
per second over the GPU's dense peak for the precision (:data:`PEAK_TFLOPS`, or ``bench.peak_tflops``).

The JSON line: ``device``, ``gpu``, ``torch``, the run's shape (``batch_size``, ``crop_size``, ``image_size``,
``rounds``, ``warmup``, ``steps_per_round``), ``setting`` / ``baseline`` (what each variant ran: ``precision``,
``fused_attn``, ``grad_checkpointing``, ``compile``, ``resize``, ``channels_last``, ``slide_batch_size``,
``slide_windows_per_forward``, ``peak_tflops``), ``train_gflops_per_step``, ``data_pipeline`` (the function's
dict, or null), ``profile`` (``bench.profile``'s rows, or null) and ``measures``:
``{name: {"setting": {"min", "median"}, "baseline": {"min", "median"}, "ratio"}}`` with ``ratio`` =
setting median / baseline median for rates (> 1: the setting is faster) and baseline / setting for memory and
workers (> 1: the setting needs less).
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import logging
import math
import statistics
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from setr.errors import SETRConfigError
from setr.utils.config import size_pair
from setr.utils.launch import task_wrapper
from setr.utils.output import print_last_line

log = logging.getLogger("setr")

# (name, unit, higher is better)
MEASURES: tuple[tuple[str, str, bool], ...] = (
    ("train_steps_per_s", "train steps/s", True),
    ("train_images_per_s", "train images/s", True),
    ("train_peak_mem_mb", "train peak memory (MB)", False),
    ("whole_images_per_s", "inference whole, images/s", True),
    ("slide_images_per_s", "inference slide, images/s", True),
    ("ms_flip_images_per_s", "inference multi-scale + flip, images/s", True),
    ("data_images_per_s_per_worker", "data pipeline, images/s per worker", True),
    ("workers_per_gpu", "data workers per GPU to keep up", False),
    ("mfu", "model FLOPs utilisation", True),
)
HEADERS = ("measure", "setting min", "setting median", "baseline min", "baseline median", "ratio")

# dense (no sparsity) peak TFLOP/s by GPU name fragment, tried in order: bf16/fp16 tensor cores, tf32, plain fp32
PEAK_TFLOPS: tuple[tuple[str, dict[str, float]], ...] = (
    ("B200", {"bf16": 2250.0, "tf32": 1100.0, "fp32": 80.0}),
    ("H200", {"bf16": 989.0, "tf32": 495.0, "fp32": 67.0}),
    ("H100 PCIe", {"bf16": 756.0, "tf32": 378.0, "fp32": 51.0}),
    ("H100 NVL", {"bf16": 835.0, "tf32": 418.0, "fp32": 60.0}),
    ("H100", {"bf16": 989.0, "tf32": 495.0, "fp32": 67.0}),  # SXM
    ("GH200", {"bf16": 989.0, "tf32": 495.0, "fp32": 67.0}),
    ("A100", {"bf16": 312.0, "tf32": 156.0, "fp32": 19.5}),
    ("L40S", {"bf16": 362.0, "tf32": 183.0, "fp32": 91.6}),
    ("L4", {"bf16": 121.0, "tf32": 60.0, "fp32": 30.3}),
    ("A10", {"bf16": 125.0, "tf32": 62.5, "fp32": 31.2}),
    ("V100", {"bf16": 125.0, "tf32": 15.7, "fp32": 15.7}),  # fp16 tensor cores; no bf16 / tf32
    ("T4", {"bf16": 65.0, "tf32": 8.1, "fp32": 8.1}),  # fp16 tensor cores
)


# ------------------------------------------------------------------------------------------- config
def _positive_int(opts: Mapping[str, Any], key: str, minimum: int = 1) -> int:
    v = opts.get(key)
    if not isinstance(v, int) or isinstance(v, bool) or v < minimum:
        raise SETRConfigError(f"bench.{key}: expected an integer >= {minimum}, got {v!r}")
    return v


def image_size_of(opts: Mapping[str, Any], data: Mapping[str, Any]) -> tuple[int, int]:
    """``bench.image_size``, or the data config's ``test_scale`` ([long, short]) as (short, long)."""
    if opts.get("image_size") is not None:
        return size_pair(opts["image_size"], "bench.image_size")
    scale = data.get("test_scale")
    if scale is None:
        return size_pair(data["crop_size"], "data.crop_size")
    long, short = size_pair(scale, "data.test_scale")
    return min(long, short), max(long, short)


def precision_of(value: Any) -> str:
    """Lightning's precision names: ``32-true``, ``bf16-mixed``, ``16-mixed``, ``bf16-true`` (and short forms)."""
    p = str(value)
    aliases = {"32": "32-true", "bf16": "bf16-mixed", "16": "16-mixed", "16-true": "16-mixed"}
    p = aliases.get(p, p)
    if p not in ("32-true", "bf16-mixed", "16-mixed", "bf16-true"):
        raise SETRConfigError(f"trainer.precision: the benchmark runs 32-true, bf16-mixed, 16-mixed or bf16-true, "
                              f"got {value!r}")
    return p


@dataclass
class Variant:
    """One side of the comparison, resolved from a composed config."""

    name: str
    precision: str
    model_cfg: dict[str, Any]  # for build_setr: `compile` removed, `fused_attn` removed when the tree lacks it
    fused_attn: bool | None  # None: timm's default
    grad_checkpointing: Any
    compile: bool
    data: dict[str, Any]
    optimizer: dict[str, Any]
    slide_batch_size: int | str = 1  # an int or auto
    windows: int | None = None  # windows per forward the slide measure ran (auto resolved)
    peak: float | None = None  # dense peak TFLOP/s for MFU
    module: Any = None
    optim: Any = None
    sched: Any = None
    scaler: Any = None
    results: dict[str, list[float]] = field(default_factory=dict)

    def describe(self) -> dict[str, Any]:
        return {"precision": self.precision, "fused_attn": self.fused_attn,
                "grad_checkpointing": self.grad_checkpointing, "compile": self.compile,
                "resize": self.module.model.resize, "channels_last": self.module.model.channels_last,
                "slide_batch_size": self.slide_batch_size, "slide_windows_per_forward": self.windows}


def _encoder_accepts(key: str) -> bool:
    from setr.models.encoder import ViTEncoder

    return key in inspect.signature(ViTEncoder.__init__).parameters


def slide_batch_size(value: Any) -> int | str:
    """``data.inference.batch_size``: an int, or ``auto`` for null / ``auto`` (sized from the device by
    :func:`setr.inference.auto_windows` when the tree has it, else one window per forward, said in a log line)."""
    import setr.inference as inference

    check = getattr(inference, "check_batch_size", None)
    if check is None:  # a tree before auto-sized windows
        if value is None or str(value).lower() == "auto":
            log.info("data.inference.batch_size=%s: this tree's setr.inference has no auto sizing; timing one "
                     "window per forward", value)
            return 1
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise SETRConfigError(f"data.inference.batch_size: expected a positive integer, got {value!r}")
        return value
    per = check(value)
    return "auto" if per is None else per


def windows_per_forward(v: Variant, size: tuple[int, int], crop: tuple[int, int], stride: Any,
                        device: torch.device) -> int:
    """The windows per forward the slide measure of ``v`` runs (``auto`` resolved as :func:`setr.inference.slide`
    does for an image of ``size``)."""
    if v.slide_batch_size != "auto":
        return int(v.slide_batch_size)
    from setr.inference import _pair as pair
    from setr.inference import auto_windows

    sh, sw = pair(stride, "stride")
    h, w = max(size[0], crop[0]), max(size[1], crop[1])
    n = (max(h - crop[0] + sh - 1, 0) // sh + 1) * (max(w - crop[1] + sw - 1, 0) // sw + 1)
    return auto_windows(v.module.model, torch.empty(1, 3, *size, device=device), crop, n)


def variant_of(cfg, name: str) -> Variant:
    """The :class:`Variant` of a composed config (``cfg`` itself for the setting, the baseline copy otherwise)."""
    from setr.nodes import plain

    model = dict(plain(cfg.model))
    model["num_classes"] = int(cfg.data.num_classes)
    enc = dict(model.get("encoder") or {})
    enc["pretrained"] = None  # random weights: speed does not depend on them, and no file is needed
    fused = enc.get("fused_attn")
    if "fused_attn" in enc and not _encoder_accepts("fused_attn"):
        enc.pop("fused_attn")  # set on timm's attention modules below instead
    ckpt = enc.get("grad_checkpointing", False)
    model["encoder"] = enc
    compile_ = model.pop("compile", None)  # applied by build_variant, after fused_attn
    if compile_ is not None and not isinstance(compile_, bool):
        raise SETRConfigError(f"model.compile: expected true or false, got {compile_!r}")
    data = plain(cfg.data)
    v = Variant(name=name, precision=precision_of(cfg.trainer.get("precision", "32-true")), model_cfg=model,
                fused_attn=None if fused is None else bool(fused), grad_checkpointing=ckpt, compile=bool(compile_),
                data=data, optimizer=plain(cfg.get("optimizer")) or {"name": "sgd", "lr": 0.01})
    v.slide_batch_size = slide_batch_size((data.get("inference") or {}).get("batch_size"))
    return v


def baseline_config(cfg):
    """A copy of ``cfg`` with ``bench.baseline`` merged on top (new keys allowed: the tree may not have them)."""
    from omegaconf import OmegaConf

    base = copy.deepcopy(cfg)
    OmegaConf.set_struct(base, False)
    overrides = cfg.bench.get("baseline") or {}
    return OmegaConf.merge(base, overrides)


# -------------------------------------------------------------------------------------------- build
def _set_fused_attn(model: torch.nn.Module, fused: bool | None) -> bool | None:
    """Set timm's ``fused_attn`` on every attention module (when asked); returns what the modules use."""
    seen = []
    for m in model.modules():
        if hasattr(m, "fused_attn") and isinstance(m.fused_attn, bool):
            if fused is not None:
                m.fused_attn = bool(fused)
            seen.append(bool(m.fused_attn))
    return (all(seen) if seen else None) if fused is None else fused


def build_variant(v: Variant, device: torch.device, total_steps: int) -> None:
    """The Lightning module, optimizer, schedule and grad scaler of ``v``, on ``device``."""
    from setr.checkpoint import ModelRecord
    from setr.training import SETRModule
    from setr.training.optim import build_optimizer, build_scheduler

    n = v.model_cfg["num_classes"]
    record = ModelRecord(model=v.model_cfg, class_names=[f"class_{i}" for i in range(n)], palette=[],
                         mean=v.data.get("mean", [0.0, 0.0, 0.0]), std=v.data.get("std", [1.0, 1.0, 1.0]),
                         ignore_index=v.data.get("ignore_index", 255), crop_size=v.data["crop_size"],
                         inference=v.data.get("inference") or {"mode": "whole"})
    module = SETRModule(record=record, optimizer=v.optimizer, compile=False)
    v.fused_attn = _set_fused_attn(module.model, v.fused_attn)
    if v.compile:  # after fused_attn is set: dynamo reads the flag when it traces
        object.__setattr__(module, "_forward", torch.compile(module.model))
    module.to(device)
    if v.precision == "bf16-true":
        module.to(torch.bfloat16)
    v.module = module
    v.optim = build_optimizer(module.model, v.optimizer)
    sched = dict(v.optimizer.get("scheduler") or {})
    sched.pop("total_steps", None)
    v.sched = build_scheduler(v.optim, sched, total_steps)
    v.scaler = torch.amp.GradScaler(device.type) if v.precision == "16-mixed" else None


def autocast(v: Variant, device: torch.device):
    if v.precision == "bf16-mixed":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    if v.precision == "16-mixed":
        return torch.autocast(device.type, dtype=torch.float16)
    return contextlib.nullcontext()


# ------------------------------------------------------------------------------------------- timing
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _resident_bytes(v: Variant) -> int:
    """Bytes the variant holds between steps: parameters, buffers, gradients, optimizer state."""
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
    """Peak memory of a block: CUDA (see the module docstring) or the process RSS sampled every 2 ms."""

    def __init__(self, device: torch.device, resident: int = 0) -> None:
        self.device, self.resident, self.peak_mb = device, resident, float("nan")
        self._stop = threading.Event()
        self._rss = 0

    def _rss_now(self) -> int:
        try:
            import psutil

            return int(psutil.Process().memory_info().rss)
        except ImportError:
            import resource

            return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # KiB on Linux

    def _sample(self) -> None:
        while not self._stop.wait(0.002):
            self._rss = max(self._rss, self._rss_now())

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            _sync(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self._rss = self._rss_now()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.device.type == "cuda":
            _sync(self.device)
            peak = torch.cuda.max_memory_allocated(self.device) - self._base + self.resident
        else:
            self._stop.set()
            self._thread.join()
            peak = max(self._rss, self._rss_now())
        self.peak_mb = peak / 2**20


def train_step_fn(v: Variant, device: torch.device, batch: int, crop: tuple[int, int]) -> Callable[[], None]:
    """One full training step of ``v`` on a fixed random batch."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, *crop, generator=gen).to(device)
    if v.precision == "bf16-true":
        x = x.to(torch.bfloat16)
    y = torch.randint(0, v.model_cfg["num_classes"], (batch, *crop), generator=gen).to(device)
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


def inference_fns(v: Variant, device: torch.device, size: tuple[int, int]) -> dict[str, Callable[[], None]]:
    """``whole`` / ``slide`` / ``ms_flip``: one image through :func:`setr.inference.infer` each."""
    from setr.inference import infer

    data = v.data
    x = torch.randn(1, 3, *size, generator=torch.Generator().manual_seed(1)).to(device)
    if v.precision == "bf16-true":
        x = x.to(torch.bfloat16)
    inf = dict(data.get("inference") or {})
    crop = inf.get("crop_size") or data["crop_size"]
    ch, cw = size_pair(crop, "data.inference.crop_size")
    stride = inf.get("stride") or [max(1, ch * 2 // 3), max(1, cw * 2 // 3)]
    slide_cfg = {"mode": "slide", "crop_size": [ch, cw], "stride": stride, "batch_size": v.slide_batch_size}
    v.windows = windows_per_forward(v, size, (ch, cw), stride, device)
    base = slide_cfg if inf.get("mode", "whole") == "slide" else {"mode": "whole"}
    ms_cfg = {**base, "scales": list(data.get("ms_ratios") or [1.0]), "flip": True, "average": "probs",
              "img_scale": data.get("test_scale"), "min_short": data.get("ms_min_short")}
    if ms_cfg["img_scale"] is None:
        ms_cfg.pop("min_short")
    forward = v.module._forward

    def run(cfg: Mapping[str, Any]) -> Callable[[], None]:
        def go() -> None:
            v.module.eval()
            with autocast(v, device):
                infer(forward, x, cfg)

        return go

    return {"whole": run({"mode": "whole"}), "slide": run(slide_cfg), "ms_flip": run(ms_cfg)}


def timed(fn: Callable[[], None], steps: int, device: torch.device) -> float:
    """Seconds per call of ``fn`` over ``steps`` calls (device synchronised before and after)."""
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    _sync(device)
    return (time.perf_counter() - t0) / steps


# ------------------------------------------------------------------------------------------ profile
def profile_train(step: Callable[[], None], steps: int, device: torch.device, rows: int,
                  step_ms: float) -> list[dict[str, Any]]:
    """The ``rows`` operators and kernels with the most self time (device time on CUDA, CPU time otherwise) over
    ``steps`` training steps under :mod:`torch.profiler`, as ``{"name", "self_ms", "share", "calls"}``:
    ``self_ms`` per step, ``share`` of ``step_ms`` (the measured step time; on CUDA an operator and the kernels
    it launched are both listed, so shares do not add up to 1)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    _sync(device)
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        _sync(device)
    events = prof.key_averages()

    def self_us(e: Any) -> float:
        if device.type == "cuda":
            return float(getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0.0))
        return float(e.self_cpu_time_total)

    top = sorted(events, key=self_us, reverse=True)[:rows]
    return [{"name": e.key, "self_ms": self_us(e) / 1e3 / steps, "share": self_us(e) / 1e3 / steps / step_ms,
             "calls": int(e.count) // steps} for e in top if self_us(e) > 0]


def render_profile(rows: Sequence[Mapping[str, Any]], title: str):
    from rich.table import Table

    table = Table(title=title)
    for h in ("operator", "self ms / step", "share of the step", "calls / step"):
        table.add_column(h, justify="left" if h == "operator" else "right")
    for r in rows:
        table.add_row(r["name"][:70], f"{r['self_ms']:.2f}", f"{100 * r['share']:.1f} %", str(r["calls"]))
    return table


# ---------------------------------------------------------------------------------------------- MFU
def peak_tflops(gpu: str | None, precision: str, override: float | None = None) -> float | None:
    """The GPU's dense peak TFLOP/s for ``precision`` (tf32 when fp32 matmuls may use it), or None."""
    if override is not None:
        return float(override)
    if gpu is None:
        return None
    for fragment, peaks in PEAK_TFLOPS:
        if fragment.lower() in gpu.lower():
            if precision != "32-true":
                return peaks["bf16"]
            tf32 = torch.backends.cuda.matmul.allow_tf32 or torch.get_float32_matmul_precision() != "highest"
            return peaks["tf32" if tf32 else "fp32"]
    return None


def train_flops_per_image(model_cfg: Mapping[str, Any], crop: tuple[int, int]) -> int:
    """3 x the FLOPs of one training-mode forward (auxiliary heads included) of one crop, counted on a meta
    model (attention via the math path, so counted whatever kernel runs)."""
    from setr.models.summary import build_meta_model, count_flops

    cfg = copy.deepcopy(dict(model_cfg))
    return 3 * count_flops(build_meta_model(cfg), crop, training=True)["total"]


# ---------------------------------------------------------------------------------------------- data
def data_throughput(data: Mapping[str, Any], num_images: int, seed: int) -> dict | None:
    """:func:`setr.data.speed.pipeline_throughput`, or None (with a log line) where the tree lacks it."""
    try:
        from setr.data.speed import pipeline_throughput
    except ImportError:
        log.warning("data pipeline: setr.data.speed.pipeline_throughput is not in this tree yet; "
                    "data_images_per_s_per_worker and workers_per_gpu are null")
        return None
    # source images of the dataset's typical size (the function's default), not the inference image
    out = dict(pipeline_throughput(data, num_images=num_images, image_size=None, seed=seed))
    if "images_per_s" not in out:
        raise SETRConfigError(f"setr.data.speed.pipeline_throughput: returned no images_per_s ({sorted(out)})")
    return out


# ------------------------------------------------------------------------------------------ results
def _stats(values: Sequence[float]) -> dict[str, float | None]:
    vals = [float(x) for x in values if x is not None and math.isfinite(x)]
    if not vals:
        return {"min": None, "median": None}
    return {"min": min(vals), "median": statistics.median(vals)}


def measures_of(setting: Variant, baseline: Variant) -> dict[str, dict[str, Any]]:
    out = {}
    for name, _, higher in MEASURES:
        s, b = _stats(setting.results.get(name, [])), _stats(baseline.results.get(name, []))
        ratio = None
        if s["median"] and b["median"]:
            ratio = s["median"] / b["median"] if higher else b["median"] / s["median"]
        out[name] = {"setting": s, "baseline": b, "ratio": ratio}
    return out


def _fmt(x: float | None, name: str) -> str:
    if x is None:
        return "-"
    if name == "mfu":
        return f"{100 * x:.1f} %"
    if name == "workers_per_gpu":
        return f"{x:g}"
    return f"{x:,.3g}" if abs(x) < 100 else f"{x:,.0f}"


def render_table(measures: Mapping[str, Mapping[str, Any]], title: str, caption: str):
    from rich.table import Table

    table = Table(title=title, caption=caption, caption_justify="left")
    for i, h in enumerate(HEADERS):
        table.add_column(h, justify="left" if i == 0 else "right")
    for name, label, _ in MEASURES:
        m = measures[name]
        r = m["ratio"]
        table.add_row(label, _fmt(m["setting"]["min"], name), _fmt(m["setting"]["median"], name),
                      _fmt(m["baseline"]["min"], name), _fmt(m["baseline"]["median"], name),
                      "-" if r is None else f"{r:.2f}x")
    return table


# --------------------------------------------------------------------------------------------- task
def resolve_device(name: Any) -> torch.device:
    text = str(name or "auto").lower()
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if text.startswith("cuda") and not torch.cuda.is_available():
        raise SETRConfigError(f"bench.device: {name!r}, but no CUDA device is available")
    if not text.startswith(("cuda", "cpu")):
        raise SETRConfigError(f"bench.device: use auto, cpu or cuda, got {name!r}")
    return torch.device(text)


def bench(cfg) -> dict[str, Any]:
    """Run the benchmark of the composed config ``cfg``; print the table and return the JSON line's dict."""
    from omegaconf import OmegaConf
    from rich.console import Console

    from setr.utils.config import check_config, extras

    check_config(cfg)
    opts = OmegaConf.to_container(cfg.get("bench") or OmegaConf.create({}), resolve=True)
    rounds = _positive_int(opts, "rounds")
    warmup = _positive_int(opts, "warmup", 0)
    steps = _positive_int(opts, "steps_per_round")
    data_images = _positive_int(opts, "data_images")
    profile_rows = _positive_int(opts, "profile", 0)
    skip = opts.get("skip") or []
    skip = {skip} if isinstance(skip, str) else set(skip)  # bench.skip=data as well as bench.skip=[data]
    known = {"whole", "slide", "ms_flip", "data"}
    if not skip <= known:
        raise SETRConfigError(f"bench.skip: unknown measure(s) {sorted(skip - known)}; choose from {sorted(known)}")
    device = resolve_device(opts.get("device"))
    extras(cfg)  # after every check that needs nothing built: an error is the first thing printed
    if "fused_attn" not in (cfg.model.get("encoder") or {}) and not _encoder_accepts("fused_attn"):
        log.info("model.encoder.fused_attn: not in this tree's config yet; the setting keeps timm's default and "
                 "the baseline sets timm's Attention.fused_attn=False on each block")
    torch.manual_seed(int(cfg.get("seed", 42)))

    setting = variant_of(cfg, "setting")
    baseline = variant_of(baseline_config(cfg), "baseline")
    crop = size_pair(setting.data["crop_size"], "data.crop_size")
    batch = int(setting.data.get("batch_size") or 1)
    size = image_size_of(opts, setting.data)
    total_steps = (warmup + rounds * steps) * 2 + 10
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None

    fns: dict[str, dict[str, Callable[[], None]]] = {}
    for v in (setting, baseline):
        build_variant(v, device, total_steps)
        fns[v.name] = {"train": train_step_fn(v, device, batch, crop),
                       **{k: f for k, f in inference_fns(v, device, size).items() if k not in skip}}
    log.info("bench: %s, setting %s, baseline %s; warm-up %d, %d rounds x %d steps", gpu or device.type,
             setting.describe(), baseline.describe(), warmup, rounds, steps)
    for v in (setting, baseline):
        for fn in fns[v.name].values():
            for _ in range(warmup):
                fn()
    _sync(device)

    for r in range(rounds):
        for v in (setting, baseline):
            res = v.results
            with PeakMemory(device, _resident_bytes(v) if device.type == "cuda" else 0) as mem:
                sec = timed(fns[v.name]["train"], steps, device)
            res.setdefault("train_steps_per_s", []).append(1 / sec)
            res.setdefault("train_images_per_s", []).append(batch / sec)
            res.setdefault("train_peak_mem_mb", []).append(mem.peak_mb)
            for mode in ("whole", "slide", "ms_flip"):
                if mode in skip:
                    continue
                res.setdefault(f"{mode}_images_per_s", []).append(1 / timed(fns[v.name][mode], steps, device))
        log.info("bench: round %d/%d done", r + 1, rounds)

    flops = train_flops_per_image(setting.model_cfg, crop) if device.type == "cuda" else None
    for v in (setting, baseline):
        peak = peak_tflops(gpu, v.precision, opts.get("peak_tflops"))
        v.peak = peak
        if flops is not None and peak:
            v.results["mfu"] = [flops * x / (peak * 1e12) for x in v.results["train_images_per_s"]]
    if device.type == "cuda" and flops is not None and not setting.peak:
        log.info("mfu: no dense peak known for %r; give bench.peak_tflops", gpu)

    profiled = None
    if profile_rows:
        step_ms = 1e3 / statistics.median(setting.results["train_steps_per_s"])
        profiled = profile_train(fns["setting"]["train"], steps, device, profile_rows, step_ms)
    data_run = None if "data" in skip else data_throughput(setting.data, data_images, int(cfg.get("seed", 42)))
    if data_run is not None:
        per_worker = float(data_run["images_per_s"])
        for v in (setting, baseline):
            v.results["data_images_per_s_per_worker"] = [per_worker]
            if per_worker > 0:
                v.results["workers_per_gpu"] = [float(math.ceil(x / per_worker))
                                                for x in v.results["train_images_per_s"]]

    measures = measures_of(setting, baseline)
    head = (setting.model_cfg.get("head") or {}).get("name") or "SETR"
    enc = (setting.model_cfg.get("encoder") or {}).get("name")
    title = (f"bench | SETR-{head} | {enc} | data={setting.data.get('name')} | {gpu or device.type} | "
             f"batch {batch} x {crop[0]}x{crop[1]} | inference {size[0]}x{size[1]}")
    caption = (f"{rounds} rounds x {steps} steps after {warmup} warm-up steps, setting and baseline interleaved. "
               f"setting: {_describe(setting)}; baseline: {_describe(baseline)}. ratio: setting / baseline of the "
               "medians (memory and workers: baseline / setting), > 1: the setting is better. Memory: "
               + ("what the variant holds plus its step's peak (CUDA)." if device.type == "cuda" else
                  "the process's peak RSS (both variants resident: an upper bound)."))
    console = Console()
    if not console.is_terminal:
        console = Console(width=140)
    console.print(render_table(measures, title, caption))
    if profiled is not None:
        console.print(render_profile(profiled, f"profile of the setting's training step ({steps} steps, self "
                                               f"{'device' if device.type == 'cuda' else 'CPU'} time)"))
    return {
        "device": device.type,
        "gpu": gpu,
        "torch": torch.__version__,
        "batch_size": batch,
        "crop_size": list(crop),
        "image_size": list(size),
        "rounds": rounds,
        "warmup": warmup,
        "steps_per_round": steps,
        "setting": {**setting.describe(), "peak_tflops": setting.peak},
        "baseline": {**baseline.describe(), "peak_tflops": baseline.peak},
        "train_gflops_per_step": None if flops is None else flops * batch / 1e9,
        "data_pipeline": data_run,
        "measures": measures,
        "profile": profiled,
    }


def _describe(v: Variant) -> str:
    attn = {True: "fused", False: "math", None: "timm default"}[v.fused_attn]
    windows = f"{v.slide_batch_size}" + (f" ({v.windows})" if v.slide_batch_size == "auto" else "")
    return (f"{v.precision}, {attn} attention, checkpointing {v.grad_checkpointing}, "
            f"compile {str(v.compile).lower()}, {v.module.model.resize} resizing, "
            f"{'channels-last' if v.module.model.channels_last else 'NCHW'} heads, "
            f"{windows} window(s) per forward")


@task_wrapper
def run(cfg) -> dict[str, Any]:
    """The job of ``src/bench.py``: print the table and the final JSON line."""
    result = bench(cfg)
    print_last_line(result)
    return result
