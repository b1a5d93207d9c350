"""``src/eval.py``: score a checkpoint on a dataset split with the test settings it was validated with.

The checkpoint is read as weights only (:func:`setr.checkpoint.read_checkpoint`, the one loader). Its record's
test-time resize (``record.test_pipeline``) and inference settings (``record.inference``) are what it is scored
with, so eval gives the number its training validated; a key named on the command line wins over the record's value
(``data.inference.<key>=...``, ``data.val_pipeline=...`` / ``data.test_scale=...``, or a group that sets them:
``protocol=ms``), while the data config's own defaults never do (:func:`test_settings`). One line says which
resize and inference settings ran and where each came from; the final JSON line (and ``metrics.json``) carries them
(``eval/test_pipeline``, ``eval/inference`` and their sources). A released SETR checkpoint (official
fudan-zvg/SETR or mmsegmentation) is taken directly: converted in memory with ``setr-convert``'s
defaults, the data config giving its class names, palette, inference settings and test resize (a line says so).
The per-class table, CSV / JSON and confusion matrix come from the same
:class:`~setr.training.callbacks.MetricReport` as in training. With a paper preset, the published number is shown
beside the measured one only when the settings are the paper's SS or MS protocol (:func:`protocol_of`).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning as L
from omegaconf import DictConfig

from setr.checkpoint import Checkpoint, ModelRecord, read_checkpoint
from setr.errors import SETRConfigError
from setr.inference import INFERENCE_KEYS, check_inference, fill_slide
from setr.nodes import plain
from setr.training import SegDataModule, SETRModule
from setr.training.callbacks import MetricReport
from setr.utils.config import check_config, extras, instantiate_group, instantiate_trainer
from setr.utils.launch import task_wrapper
from setr.utils.output import print_last_line, write_metrics

log = logging.getLogger("setr")

# trainer keys that only mean something while fitting
FIT_ONLY = ("max_epochs", "max_steps", "check_val_every_n_epoch", "val_check_interval", "sync_batchnorm",
            "gradient_clip_val", "accumulate_grad_batches")


# command-line keys (under data.) that change the test resize, and those a published comparison cannot follow
PIPELINE_KEYS = ("val_pipeline", "test_scale")
PROTOCOL_DATA_KEYS = ("val_pipeline", "test_scale", "ms_ratios", "ms_min_short")
# what conf/protocol/ms.yaml sets, for a protocol config that cannot be read back
PROTOCOL_FALLBACK = {"data": {"val_pipeline": [], "inference": dict.fromkeys(
    ("img_scale", "scales", "flip", "min_short", "average"))}}
RECORD, COMMAND_LINE, DATA_CONFIG = "record", "command line", "data config"


def module_of(ckpt: Checkpoint, record: ModelRecord) -> SETRModule:
    """The Lightning module of a checkpoint for evaluation (weights only, compile off) with ``record`` (the
    checkpoint's, with the test settings eval runs with)."""
    module = SETRModule(record=record, optimizer=ckpt.hyper_parameters.get("optimizer"))
    ckpt.load_into(module.model)
    return module


# ------------------------------------------------------------------------------ which settings, from where
def command_line() -> tuple[list[str], str | None]:
    """(the overrides of the running Hydra job, its ``protocol`` choice); ``([], None)`` outside a Hydra job."""
    try:
        from hydra.core.hydra_config import HydraConfig

        hc = HydraConfig.get()
    except (ImportError, ValueError):
        return [], None
    return [str(o) for o in hc.overrides.task], hc.runtime.choices.get("protocol")


def protocol_node(choice: str | None) -> dict[str, Any]:
    """What the ``protocol`` group option ``choice`` sets (its yaml, unresolved), read from the running job's
    config folders; the official MS keys when it cannot be read."""
    if not choice:
        return {}
    from omegaconf import OmegaConf

    try:
        from hydra.core.hydra_config import HydraConfig

        for src in HydraConfig.get().runtime.config_sources:
            f = Path(str(src.path)) / "protocol" / f"{choice}.yaml"
            if src.schema == "file" and f.is_file():
                node = OmegaConf.to_container(OmegaConf.load(f), resolve=False)
                return node if isinstance(node, dict) else {}
    except (ImportError, ValueError, OSError):
        pass
    return PROTOCOL_FALLBACK


def named_keys(overrides: list[str], protocol: Mapping[str, Any] | None = None) -> tuple[set[str], set[str]]:
    """(the ``data.inference`` keys, the other ``data.`` keys) that ``overrides`` (Hydra's ``key=value``, ``+``,
    ``++``, ``~``) and the ``protocol`` node name; ``data.inference=...`` names every inference key."""
    inference: set[str] = set()
    other: set[str] = set()
    for o in overrides:
        key = o.split("=", 1)[0].lstrip("+~").strip()
        parts = key.split(".")
        if parts[0] != "data" or len(parts) < 2:
            continue
        if parts[1] == "inference":
            inference.update(parts[2:3] or INFERENCE_KEYS)
        else:
            other.add(parts[1])
    node = dict((protocol or {}).get("data") or {})
    inference.update(dict(node.pop("inference", None) or {}))
    other.update(node)
    return inference, other


def test_settings(cfg: DictConfig, record: ModelRecord, released: bool = False,
                  overrides: list[str] | None = None, protocol: str | None = None
                  ) -> tuple[dict[str, Any], dict[str, str], list[dict[str, Any]], str]:
    """(inference settings, the source of each key, test resize steps, their source) that ``record`` is scored
    with: the record's, each key the command line (``overrides``, the ``protocol`` group) names taken from the
    composed ``cfg.data`` instead. ``released``: the record was made from the data config (a released checkpoint
    converted in memory), whose values are then the source. In mode ``slide`` a missing window / stride is the
    record's crop and 2/3 of it. The data config's unnamed defaults are never used for a checkpoint of this
    project: they may differ from what its training validated with."""
    base = DATA_CONFIG if released else RECORD
    node = dict(plain(cfg.data.get("inference")) or {})
    inf_keys, data_keys = named_keys(overrides or [], protocol_node(protocol))
    inference = dict(record.inference or {})
    sources = dict.fromkeys(inference, base)
    for key in sorted(inf_keys):
        if key not in INFERENCE_KEYS:
            raise SETRConfigError(f"data.inference.{key}: unknown key; use {', '.join(INFERENCE_KEYS)}")
        if node.get(key) is None:
            inference.pop(key, None)
        else:
            inference[key] = node[key]
        sources[key] = COMMAND_LINE
    before = set(inference)
    fill_slide(inference, record.crop_size)
    for key in set(inference) - before:
        sources[key] = base if key == "mode" else f"{base} (training crop)"
    sources = {k: sources[k] for k in inference}
    if data_keys & set(PIPELINE_KEYS):
        pipeline, pipeline_source = list(plain(cfg.data.get("val_pipeline")) or []), COMMAND_LINE
    else:
        pipeline, pipeline_source = list(record.test_pipeline), base
    return inference, sources, pipeline, pipeline_source


def describe_steps(steps: list[Mapping[str, Any]]) -> str:
    """Test resize steps in a few words: ``RandomRescale(img_scale=[2048, 512], ratio_range=None)``."""
    if not steps:
        return "none (native size)"
    return " + ".join(f"{str(s.get('_target_')).rsplit('.', 1)[-1]}("
                      + ", ".join(f"{k}={v}" for k, v in s.items() if k != "_target_") + ")" for s in steps)


def describe_sources(sources: Mapping[str, str]) -> str:
    """``{key: source}`` grouped: ``record: mode, crop_size; command line: stride``."""
    groups: dict[str, list[str]] = {}
    for key, src in sources.items():
        groups.setdefault(src, []).append(key)
    return "; ".join(f"{src}: {', '.join(keys)}" for src, keys in groups.items()) or "defaults"


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Score ``cfg.ckpt_path`` on ``cfg.data`` (its ``split``) with the checkpoint's test resize and inference
    settings, the keys the command line names taking the composed config's values (:func:`test_settings`)."""
    check_config(cfg, data=True)
    split = cfg.get("split", "val")
    if split not in ("val", "test"):
        raise SETRConfigError(f"split: use val or test, got {split!r}")
    extras(cfg)  # after every check that needs nothing built: an error is the first thing printed
    data = plain(cfg.data)
    datamodule = SegDataModule(data, seed=cfg.seed)  # lazy: datasets are built on first use
    # for a released checkpoint: the data's class names and palette (the dataset's own when the config has none)
    hint = {**data, "class_names": plain(cfg.data.get("class_names")) or (lambda: datamodule.class_names),
            "palette": lambda: datamodule.palette}
    ckpt = read_checkpoint(str(cfg.ckpt_path), data=hint, convert=plain(cfg.get("convert")))
    record, released = ckpt.record, ckpt.converted_now
    if record.num_classes != cfg.data.num_classes:
        raise SETRConfigError(
            f"data.num_classes: the checkpoint predicts {record.num_classes} classes, data={cfg.data.name} "
            f"has {cfg.data.num_classes}")
    overrides, protocol = command_line()
    inference, sources, pipeline, pipeline_source = test_settings(cfg, record, released, overrides, protocol)
    check_inference(inference)  # one line before any forward (a stride longer than the window, ...)
    log.info("eval settings: test resize %s (%s) | inference %s (%s)", describe_steps(pipeline), pipeline_source,
             inference, describe_sources(sources))
    module = module_of(ckpt, dataclasses.replace(record, inference=inference, test_pipeline=pipeline))
    # the record's resize and normalisation (the encoder's pretraining statistics it was trained with), not the
    # data config's: an EVA-02 checkpoint (CLIP statistics) scored under ImageNet's would be silently wrong
    norm = {"mean": list(record.mean), "std": list(record.std)}
    if list(data.get("mean") or []) != norm["mean"] or list(data.get("std") or []) != norm["std"]:
        log.info("eval normalisation: the checkpoint's mean %s / std %s (data config: %s / %s)", norm["mean"],
                 norm["std"], data.get("mean"), data.get("std"))
    if pipeline != list(data.get("val_pipeline") or []) or any(list(data.get(k) or []) != v for k, v in norm.items()):
        datamodule = SegDataModule({**data, "val_pipeline": pipeline, **norm}, seed=cfg.seed)
    loggers = instantiate_group(cfg.get("logger"), "logger")
    trainer_cfg = {k: v for k, v in plain(cfg.trainer).items() if k not in FIT_ONLY}
    report = MetricReport(output_dir=cfg.paths.output_dir)
    trainer: L.Trainer = instantiate_trainer(trainer_cfg, logger=loggers or False, callbacks=[report])
    if split == "val":
        trainer.validate(module, datamodule=datamodule)
    else:
        trainer.test(module, datamodule=datamodule)
    scores = module.metrics_for(split).compute()
    metrics = {f"{split}/{k}": float(scores[k]) for k in ("mIoU", "mAcc", "aAcc")}
    for name, v in zip(module.record.class_names, scores["iou"]):
        metrics[f"{split}/IoU/{name}"] = float(v)
    metrics.update({"eval/test_pipeline": pipeline, "eval/test_pipeline_source": pipeline_source,
                    "eval/inference": inference, "eval/inference_source": sources})
    protocol_name, why = protocol_of(inference, pipeline, cfg, overrides, protocol)
    metrics.update(compare_published(metrics, split, plain(cfg.get("published")), protocol_name, why))
    if trainer.is_global_zero:
        write_metrics(metrics, cfg.paths.output_dir)
    return metrics


def _normal(inference: Mapping[str, Any]) -> dict[str, Any]:
    """Inference settings in one form for comparison (defaults filled, sizes as pairs, no ``batch_size``: the
    windows per forward never change the logits)."""
    from setr.values import size_pair

    mode = inference.get("mode") or "whole"
    out: dict[str, Any] = {
        "mode": mode, "scales": [float(s) for s in inference.get("scales") or [1.0]],
        "flip": bool(inference.get("flip")), "average": inference.get("average") or "logits",
        "img_scale": sorted(size_pair(inference["img_scale"], "img_scale"))
        if inference.get("img_scale") is not None else None,
        "min_short": int(inference["min_short"]) if inference.get("min_short") is not None else None}
    if mode == "slide":
        out["crop_size"] = size_pair(inference.get("crop_size"), "data.inference.crop_size")
        out["stride"] = size_pair(inference.get("stride"), "data.inference.stride")
    return out


def paper_protocols(data: Mapping[str, Any], protocol_chosen: bool) -> dict[str, tuple[dict, list]]:
    """``{"ss": (inference, test resize), "ms": (...)}`` of the paper for the data config ``data`` (composed):
    SS is the data config's test as it is (its ``val_pipeline`` resize, its ``inference`` at one scale, no flip);
    MS is what ``conf/protocol/ms.yaml`` makes of it (``ms_ratios``, flip, ``img_scale = test_scale``,
    ``min_short = ms_min_short``, probabilities averaged, no resize first). With a protocol group chosen, the
    composed data config no longer holds its own SS test: only MS is given."""
    node = dict(data.get("inference") or {})
    base = {k: node.get(k) for k in ("mode", "crop_size", "stride")}
    ms = {**base, "scales": data.get("ms_ratios"), "flip": True, "img_scale": data.get("test_scale"),
          "min_short": data.get("ms_min_short"), "average": "probs"}
    out = {"ms": (_normal(ms), [])}
    if not protocol_chosen:
        out["ss"] = (_normal(base), list(data.get("val_pipeline") or []))
    return out


def protocol_of(inference: Mapping[str, Any], test_pipeline: list[Mapping[str, Any]], cfg: DictConfig,
                overrides: list[str] | None = None, protocol: str | None = None) -> tuple[str | None, str]:
    """(``ss`` / ``ms`` / None, why): which of the paper's protocols the settings that ran are, for the published
    SS / MS columns. Only the official protocols count: the data config's single-scale test, or its multi-scale +
    flip test as ``protocol=ms`` sets it (:func:`paper_protocols`); any other setting (another stride, a flip
    alone, other ratios, no test resize, ...) is None, as is one that changes the data config's test keys on the
    command line (there the composed config no longer says what the paper's test is). ``overrides`` /
    ``protocol``: the job's command line and protocol choice (:func:`command_line`)."""
    overrides = overrides or []
    inf_keys, data_keys = named_keys(overrides)
    changed = sorted(f"data.inference.{k}" for k in inf_keys - {"batch_size"})
    changed += sorted(f"data.{k}" for k in data_keys & set(PROTOCOL_DATA_KEYS))
    if changed:
        return None, f"{', '.join(changed)} set on the command line"
    try:
        used = (_normal(inference), [dict(s) for s in test_pipeline])
        refs = paper_protocols(plain(cfg.data), protocol_chosen=bool(protocol))
    except SETRConfigError as e:
        return None, str(e)
    for name, ref in refs.items():
        if used == ref:
            return name, ""
    return None, f"inference {inference}, test resize {describe_steps(test_pipeline)}"


def compare_published(metrics: Mapping[str, float], split: str, published: Mapping[str, Any] | None,
                      protocol: str | None, why: str = "") -> dict[str, Any]:
    """The published mIoU of the preset for this protocol beside the measured one: a printed line, and
    ``published/mIoU`` (a fraction, like ``val/mIoU``), ``published/protocol``, ``published/source`` and
    ``diff/mIoU`` (measured - published) for the JSON line. Nothing without a preset or a published number, and
    nothing but a line saying so when the settings are not the paper's SS or MS protocol (``protocol`` None)."""
    if not published:
        return {}
    if protocol is None:
        log.info("published: no comparison, the inference settings are not the paper's SS or MS protocol (%s)", why)
        return {}
    value = published.get(protocol)
    if value is None:
        log.info("published: the preset has no %s number (%s)", protocol.upper(), published.get("source", ""))
        return {}
    ref, got = float(value) / 100.0, float(metrics[f"{split}/mIoU"])
    log.info("mIoU %.2f measured, %.2f published (%s, %s): %+.2f", 100 * got, 100 * ref, protocol.upper(),
             published.get("source", "?"), 100 * (got - ref))
    return {"published/mIoU": ref, "published/protocol": protocol, "published/source": published.get("source"),
            "diff/mIoU": got - ref}


@task_wrapper
def run(cfg: DictConfig) -> dict[str, Any]:
    """The job of ``src/eval.py``: evaluate and print the final JSON line."""
    metrics = evaluate(cfg)
    print_last_line(metrics)
    return metrics
