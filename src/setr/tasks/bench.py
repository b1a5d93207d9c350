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
per second over the GPU's dense peak for the precision (:data:`setr.benchmark.mfu.PEAK_TFLOPS`, or
``bench.peak_tflops``).

The JSON line: ``device``, ``gpu``, ``torch``, the run's shape (``batch_size``, ``crop_size``, ``image_size``,
``rounds``, ``warmup``, ``steps_per_round``), ``setting`` / ``baseline`` (what each variant ran: ``precision``,
``fused_attn``, ``grad_checkpointing``, ``compile``, ``resize``, ``channels_last``, ``slide_batch_size``,
``slide_windows_per_forward``, ``peak_tflops``), ``train_gflops_per_step``, ``data_pipeline`` (the function's
dict, or null), ``profile`` (``bench.profile``'s rows, or null) and ``measures``:
``{name: {"setting": {"min", "median"}, "baseline": {"min", "median"}, "ratio"}}`` with ``ratio`` =
setting median / baseline median for rates (> 1: the setting is faster) and baseline / setting for memory and
workers (> 1: the setting needs less).

This module checks the ``bench`` config, runs the rounds and prints; each measure is a module of
:mod:`setr.benchmark` (variant, timing, train, inference, data, mfu, profile).
"""

from __future__ import annotations

import logging
import statistics
from collections.abc import Callable, Mapping
from typing import Any

import torch

from setr.benchmark.data import data_throughput, workers_per_gpu
from setr.benchmark.inference import MODES, inference_fns, inference_round
from setr.benchmark.mfu import mfu, peak_tflops, train_flops_per_image
from setr.benchmark.profile import profile_train, render_profile
from setr.benchmark.timing import MEASURES, measures_of, warm_up
from setr.benchmark.train import train_round, train_step_fn
from setr.benchmark.variant import Variant, baseline_config, build_variant, variant_of
from setr.errors import SETRConfigError
from setr.utils.launch import task_wrapper
from setr.utils.output import print_last_line
from setr.values import positive_int, resolve_device, size_pair

log = logging.getLogger("setr")

HEADERS = ("measure", "setting min", "setting median", "baseline min", "baseline median", "ratio")
SKIPPABLE = (*MODES, "data")


# ------------------------------------------------------------------------------------------- config
def image_size_of(opts: Mapping[str, Any], data: Mapping[str, Any]) -> tuple[int, int]:
    """``bench.image_size``, or the data config's ``test_scale`` ([long, short]) as (short, long)."""
    if opts.get("image_size") is not None:
        return size_pair(opts["image_size"], "bench.image_size")
    scale = data.get("test_scale")
    if scale is None:
        return size_pair(data["crop_size"], "data.crop_size")
    long, short = size_pair(scale, "data.test_scale")
    return min(long, short), max(long, short)


def skipped(value: Any) -> set[str]:
    """``bench.skip`` as a set: one name (``bench.skip=data``) or a list; an unknown name is one line."""
    skip = value or []
    skip = {skip} if isinstance(skip, str) else set(skip)
    if not skip <= set(SKIPPABLE):
        raise SETRConfigError(f"bench.skip: unknown measure(s) {sorted(skip - set(SKIPPABLE))}; "
                              f"choose from {sorted(SKIPPABLE)}")
    return skip


# -------------------------------------------------------------------------------------------- table
def _fmt(x: float | None, name: str) -> str:
    if x is None:
        return "-"
    if name == "mfu":
        return f"{100 * x:.1f} %"
    if name == "workers_per_gpu":
        return f"{x:g}"
    return f"{x:,.3g}" if abs(x) < 100 else f"{x:,.0f}"


def render_table(measures: Mapping[str, Mapping[str, Any]], title: str, caption: str):
    """The rich table of :func:`setr.benchmark.timing.measures_of`: one row per measure, in :data:`MEASURES`
    order."""
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


def _describe(v: Variant) -> str:
    attn = "fused" if v.fused_attn else "math"
    windows = f"{v.slide_batch_size}" + (f" ({v.windows})" if v.slide_batch_size == "auto" else "")
    return (f"{v.precision}, {attn} attention, checkpointing {v.grad_checkpointing}, "
            f"compile {str(v.compile).lower()}, {v.module.model.resize} resizing, "
            f"{'channels-last' if v.module.model.channels_last else 'NCHW'} heads, "
            f"{windows} window(s) per forward")


# --------------------------------------------------------------------------------------------- task
def bench(cfg) -> dict[str, Any]:
    """Run the benchmark of the composed config ``cfg``; print the table and return the JSON line's dict."""
    from omegaconf import OmegaConf
    from rich.console import Console

    from setr.utils.config import check_config, extras

    check_config(cfg)
    opts = OmegaConf.to_container(cfg.get("bench") or OmegaConf.create({}), resolve=True)
    rounds = positive_int(opts.get("rounds"), "bench.rounds")
    warmup = positive_int(opts.get("warmup"), "bench.warmup", 0)
    steps = positive_int(opts.get("steps_per_round"), "bench.steps_per_round")
    data_images = positive_int(opts.get("data_images"), "bench.data_images")
    profile_rows = positive_int(opts.get("profile"), "bench.profile", 0)
    skip = skipped(opts.get("skip"))
    device = resolve_device(opts.get("device"), "bench.device")
    extras(cfg)  # after every check that needs nothing built: an error is the first thing printed
    seed = int(cfg.get("seed", 42))
    torch.manual_seed(seed)

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
    warm_up([fn for v in (setting, baseline) for fn in fns[v.name].values()], warmup, device)

    for r in range(rounds):  # interleaved: a drift of clocks or temperature falls on both variants alike
        for v in (setting, baseline):
            train_round(v, fns[v.name]["train"], steps, batch, device)
            inference_round(v, fns[v.name], steps, device)
        log.info("bench: round %d/%d done", r + 1, rounds)

    flops = train_flops_per_image(setting.model_cfg, crop) if device.type == "cuda" else None
    for v in (setting, baseline):
        v.peak = peak_tflops(gpu, v.precision, opts.get("peak_tflops"))
        if flops is not None and v.peak:
            v.results["mfu"] = mfu(flops, v.results["train_images_per_s"], v.peak)
    if device.type == "cuda" and flops is not None and not setting.peak:
        log.info("mfu: no dense peak known for %r; give bench.peak_tflops", gpu)

    profiled = None
    if profile_rows:
        step_ms = 1e3 / statistics.median(setting.results["train_steps_per_s"])
        profiled = profile_train(fns["setting"]["train"], steps, device, profile_rows, step_ms)
    data_run = None if "data" in skip else data_throughput(setting.data, data_images, seed)
    if data_run is not None:
        per_worker = float(data_run["images_per_s"])
        for v in (setting, baseline):
            v.results["data_images_per_s_per_worker"] = [per_worker]
            v.results["workers_per_gpu"] = workers_per_gpu(v.results["train_images_per_s"], per_worker)

    measures = measures_of(setting.results, baseline.results)
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


@task_wrapper
def run(cfg) -> dict[str, Any]:
    """The job of ``src/bench.py``: print the table and the final JSON line."""
    result = bench(cfg)
    print_last_line(result)
    return result
