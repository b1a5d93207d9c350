"""The typed table of config keys and the refusal of ``+key`` overrides that nothing reads.

:func:`setr.utils.config.check_config` runs both before anything is built or printed, so a wrong value ends the
run with one line ``error: <key>: expected <what>, got <value>`` as the first thing the user sees, instead of a
traceback (``seed=abc``), a library's message without the key (``trainer: '<' not supported ...``) or a run that
silently does something else (``trainer.max_steps=3.5``).

``+key=value`` adds a key that the composed config does not have; Hydra suggests it when a key is unknown
(``key not in struct ... To append use +key``), so a typo followed by that advice (``+optimizer.lrr=0.1``) was
accepted and ignored. A ``+`` key under a node whose readers are known (:data:`CLOSED`: the optimizer, the data
config's top level, the Lightning ``Trainer`` arguments, the model, the task's top level) is refused unless
something reads it, with the nearest known key.
"""

from __future__ import annotations

import difflib
import inspect
import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from setr.errors import SETRConfigError
from setr.values import IGNORE_INDEX

# ------------------------------------------------------------------------------------------ value checks
# Each check returns None when the value is fine, else what was expected (the error line's "expected ...").
Check = Callable[[Any], "str | None"]


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def integer(lo: int | None = None, hi: int | None = None, also: tuple = (), what: str | None = None) -> Check:
    """An int in ``[lo, hi]`` (or one of ``also``, e.g. ``-1`` or ``None``)."""
    text = what or "an int" + (f" >= {lo}" if lo is not None and hi is None else "") + (
        f" in {lo}..{hi}" if lo is not None and hi is not None else "")

    def check(v: Any) -> str | None:
        if v in also and (v is None or _is_int(v)):
            return None
        if _is_int(v) and (lo is None or v >= lo) and (hi is None or v <= hi):
            return None
        return text

    return check


def number(lo: float | None = None, hi: float | None = None, lo_open: bool = False, hi_open: bool = False,
           null: bool = False, what: str | None = None) -> Check:
    """A finite int or float in the interval (``null``: None allowed too)."""
    if what is None:
        if lo is not None and hi is not None:
            what = f"a number in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
        elif lo is not None:
            what = f"a number {'>' if lo_open else '>='} {lo:g}"
        else:
            what = "a number"
        what += " or null" if null else ""

    def check(v: Any) -> str | None:
        if v is None and null:
            return None
        if not _is_number(v):
            return what
        if lo is not None and (v <= lo if lo_open else v < lo):
            return what
        if hi is not None and (v >= hi if hi_open else v > hi):
            return what
        return None

    return check


def boolean(null: bool = False, words: tuple[str, ...] = ()) -> Check:
    """true / false (YAML's), or None with ``null``, or one of the strings ``words``."""
    what = "true or false" + "".join(f" or {w}" for w in words) + (" or null" if null else "")
    return lambda v: None if isinstance(v, bool) or (v is None and null) or (isinstance(v, str) and v in words) \
        else what


class Lazy:
    """A table entry built when first needed (its options come from Lightning or the model code)."""

    def __init__(self, make: Callable[[], Check]) -> None:
        self.make = make


def choice(options: Iterable[Any]) -> Check:
    options = tuple(options)

    def check(v: Any) -> str | None:
        ok = any(v == o and type(v) is type(o) for o in options)  # 16 (int) and "16" both listed where allowed
        return None if ok else "one of " + ", ".join(dict.fromkeys(str(o) for o in options))

    return check


def size(v: Any) -> str | None:
    """An int > 0 or ``[height, width]`` of ints > 0."""
    if _is_int(v) and v > 0:
        return None
    if isinstance(v, (list, tuple)) and len(v) == 2 and all(_is_int(x) and x > 0 for x in v):
        return None
    return "a size > 0 or [height, width]"


def three_numbers(positive: bool = False) -> Check:
    what = "3 numbers (R, G, B on the 0..255 scale)" + (", each > 0" if positive else "")
    return lambda v: None if isinstance(v, (list, tuple)) and len(v) == 3 and all(
        _is_number(x) and (x > 0 or not positive) for x in v) else what


def fraction_or_count(v: Any) -> str | None:
    """Lightning's ``limit_*_batches`` / ``overfit_batches``: an int >= 0 (batches) or a float in [0, 1]."""
    if v is None or (_is_int(v) and v >= 0) or (isinstance(v, float) and 0.0 <= v <= 1.0):
        return None
    return "an int >= 0 (batches) or a float in [0, 1] (a fraction)"


def val_check_interval(v: Any) -> str | None:
    if v is None or (_is_int(v) and v >= 1) or (isinstance(v, float) and 0.0 < v <= 1.0):
        return None
    return "an int >= 1 (every N training steps) or a float in (0, 1] (a fraction of an epoch)"


def devices(v: Any) -> str | None:
    """Lightning's ``devices``: ``auto``, an int >= 1 or -1 (all), a list of device ids, or ``"0,1"``."""
    what = "auto, an int >= 1, -1 (all), a list of device ids or a string like '0,1'"
    if v == "auto" or (_is_int(v) and (v >= 1 or v == -1)):
        return None
    if isinstance(v, (list, tuple)) and v and all(_is_int(x) and x >= 0 for x in v):
        return None
    if isinstance(v, str) and v.strip():
        parts = [p.strip() for p in v.split(",") if p.strip()]
        if (parts and all(p.isdigit() for p in parts)) or v.strip() == "-1":
            return None
    return what


def pair_of_numbers(lo: float, hi: float) -> Check:
    what = f"2 numbers in [{lo:g}, {hi:g})"
    return lambda v: None if isinstance(v, (list, tuple)) and len(v) == 2 and all(
        _is_number(x) and lo <= x < hi for x in v) else what


def _precisions() -> tuple[Any, ...]:
    """Every ``precision`` value Lightning accepts (its own ``Literal`` types), e.g. ``32-true``, ``bf16-mixed``."""
    import typing

    from lightning.fabric.connector import _PRECISION_INPUT

    def flat(t: Any) -> list[Any]:
        args = typing.get_args(t)
        return [x for a in args for x in (flat(a) if typing.get_args(a) else [a])] if args else [t]

    return tuple(flat(_PRECISION_INPUT))


def _norms() -> tuple[str, ...]:
    from setr.models.norm import NORM_LAYERS

    return tuple(NORM_LAYERS)


def _resize_modes() -> tuple[str, ...]:
    from setr.models.setr import RESIZE_MODES

    return tuple(RESIZE_MODES)


def _loss_paths() -> tuple[str, ...]:
    from setr.models.seg_loss import LOSS_PATHS

    return tuple(LOSS_PATHS)


# key -> check; a key absent from the composed config is not checked (each task composes other groups).
# Lazy entries keep Lightning and the model code out of this module's import.
TYPES: dict[str, Check | Lazy] = {
    "seed": integer(also=(None,), what="an int or null"),
    # trainer: the Lightning Trainer arguments this project's configs set
    "trainer.max_steps": integer(1, also=(-1,), what="an int > 0, or -1 (no step limit)"),
    "trainer.max_epochs": integer(0, also=(-1, None), what="an int >= 0, -1 (no epoch limit) or null"),
    "trainer.min_epochs": integer(0, also=(None,), what="an int >= 0 or null"),
    "trainer.min_steps": integer(0, also=(None, -1), what="an int >= 0 or null"),
    "trainer.val_check_interval": val_check_interval,
    "trainer.check_val_every_n_epoch": integer(1, also=(None,), what="an int >= 1 or null"),
    "trainer.log_every_n_steps": integer(1, what="an int >= 1"),
    "trainer.num_sanity_val_steps": integer(0, also=(-1,), what="an int >= 0, or -1 (the whole validation)"),
    "trainer.devices": devices,
    "trainer.num_nodes": integer(1, what="an int >= 1"),
    "trainer.precision": Lazy(lambda: choice(_precisions())),
    "trainer.gradient_clip_val": number(0, null=True),
    "trainer.gradient_clip_algorithm": choice(("norm", "value", None)),
    "trainer.accumulate_grad_batches": integer(1, what="an int >= 1"),
    "trainer.limit_train_batches": fraction_or_count,
    "trainer.limit_val_batches": fraction_or_count,
    "trainer.limit_test_batches": fraction_or_count,
    "trainer.overfit_batches": fraction_or_count,
    "trainer.fast_dev_run": lambda v: None if isinstance(v, bool) or (_is_int(v) and v >= 0)
    else "true, false or a number of batches >= 0",
    "trainer.deterministic": boolean(null=True, words=("warn",)),
    "trainer.benchmark": boolean(null=True),
    "trainer.sync_batchnorm": boolean(),
    "trainer.use_distributed_sampler": boolean(),
    "callbacks.progress_log.every_n_steps": integer(0, also=(None,), what="an int >= 0 or null"),
    "callbacks.progress_log.heartbeat": choice(("auto", "always", "never")),
    # data: what the data module, the record and the inference read
    "data.num_classes": integer(1, what="an int >= 1 (the number of classes)"),
    "data.batch_size": integer(1, what="an int >= 1 (images per device)"),
    "data.val_batch_size": integer(1, what="an int >= 1 (images per device)"),
    "data.num_workers": integer(0, what="an int >= 0 (0: load in the main process)"),
    "data.crop_size": size,
    "data.test_scale": size,
    "data.mean": three_numbers(),
    "data.std": three_numbers(positive=True),
    "data.pin_memory": boolean(),
    "data.persistent_workers": boolean(),
    "data.skip_bad": boolean(),
    "data.val_keep_original_mask": boolean(),
    # optimizer: what setr.training.optim reads (optimizer.lr has its own check in check_config)
    "optimizer.name": choice(("sgd", "adamw")),
    "optimizer.momentum": number(0, 1, what="a number in [0, 1]"),
    "optimizer.weight_decay": number(0),
    "optimizer.head_lr_mult": number(0, lo_open=True),
    "optimizer.layer_decay": number(0, 1, lo_open=True, null=True),
    "optimizer.betas": pair_of_numbers(0, 1),
    "optimizer.no_decay_norm_bias_pos": boolean(),
    "optimizer.scheduler.name": choice(("poly", "constant")),
    "optimizer.scheduler.power": number(0),
    "optimizer.scheduler.min_lr": number(0),
    "optimizer.scheduler.warmup_steps": integer(0, what="an int >= 0"),
    "optimizer.scheduler.warmup_ratio": number(0, 1),
    "optimizer.scheduler.total_steps": integer(1, also=(None,), what="an int >= 1 or null (trainer.max_steps)"),
    # model
    "model.compile": boolean(),
    "model.channels_last": boolean(),
    "model.norm": Lazy(lambda: choice(_norms())),
    "model.resize": Lazy(lambda: choice(_resize_modes())),
    "model.loss_path": Lazy(lambda: choice(_loss_paths())),
}

# The label value that means "not labelled" (setr.values.IGNORE_INDEX): every dataset, the label check and the
# crop padding write it, so another data.ignore_index would score the padding as a class.

# what a `???` key is and how to set it (the error line of a mandatory key left unset)
MISSING_HINTS = {
    "data.num_classes": "pass data.num_classes=N on the command line, N = the number of classes listed in the "
                        "dataset's classes.yaml (data=folder: <data.root>/classes.yaml; checked), e.g. "
                        "data.num_classes=3",
}


def missing_line(key: str) -> str:
    """The error line of a mandatory (``???``) key that was not set."""
    return f"{key}: required; {MISSING_HINTS.get(key) or f'pass {key}=<value> on the command line'}"


def _value(cfg: DictConfig, key: str) -> tuple[bool, Any]:
    """``(present, resolved plain value)`` of a dotted key."""
    parent_key, _, leaf = key.rpartition(".")
    parent = OmegaConf.select(cfg, parent_key) if parent_key else cfg
    if not isinstance(parent, DictConfig) or leaf not in parent:
        return False, None
    if OmegaConf.is_missing(parent, leaf):
        raise SETRConfigError(missing_line(key))
    value = parent[leaf]
    if isinstance(value, (DictConfig, ListConfig)):
        value = OmegaConf.to_container(value, resolve=True)
    return True, value


def check_types(cfg: DictConfig) -> None:
    """Every key of :data:`TYPES` the config has, and the ``data.ignore_index`` convention: one line naming the
    first bad key, ``<key>: expected <what>, got <value!r>``."""
    for key, check in TYPES.items():
        present, value = _value(cfg, key)
        if not present:
            continue
        if isinstance(check, Lazy):
            check = TYPES[key] = check.make()
        what = check(value)
        if what:
            raise SETRConfigError(f"{key}: expected {what}, got {value!r}")
    present, value = _value(cfg, "data.ignore_index")
    if present and not (_is_int(value) and value == IGNORE_INDEX):
        raise SETRConfigError(
            f"data.ignore_index: expected {IGNORE_INDEX} (the label value every dataset and the crop padding write "
            f"for unlabelled pixels; class ids are 0..num_classes-1), got {value!r}")


# ------------------------------------------------------------------------------------------ `+` keys
OPTIMIZER_KEYS = ("name", "lr", "momentum", "weight_decay", "head_lr_mult", "no_decay_norm_bias_pos", "layer_decay",
                  "betas", "scheduler")
SCHEDULER_KEYS = ("name", "power", "min_lr", "warmup_steps", "warmup_ratio", "total_steps")
# the data config's top level: every key of conf/data/*.yaml, and val_split (read by the data module: debug=overfit)
DATA_KEYS = ("name", "root", "num_classes", "class_names", "crop_size", "ignore_index", "mean", "std", "dataset",
             "val_dataset", "batch_size", "val_batch_size", "num_workers", "pin_memory", "persistent_workers",
             "skip_bad", "check", "val_keep_original_mask", "train_pipeline", "val_pipeline", "test_scale",
             "ms_ratios", "ms_min_short", "inference", "val_split", "split")
MODEL_KEYS = ("num_classes", "norm", "encoder", "head", "resize", "channels_last", "compile", "loss_path")
EXTRAS_KEYS = ("ignore_warnings", "print_config")
# top-level keys some task reads although no entry config of it sets them (a paper preset sets `published`)
ROOT_OPTIONAL = ("published", "convert", "split", "metric", "seed", "tags")


def _trainer_keys() -> tuple[str, ...]:
    from lightning.pytorch import Trainer

    return ("_target_", *[p for p in inspect.signature(Trainer.__init__).parameters if p != "self"])


def _encoder_keys() -> tuple[str, ...]:
    from setr.models.encoder import ViTEncoder
    from setr.models.setr import ENCODER_CONFIG_ONLY

    return (*[p for p in inspect.signature(ViTEncoder.__init__).parameters if p != "self"], *ENCODER_CONFIG_ONLY)


def _head_keys() -> tuple[str, ...]:
    from setr.models.setr import HEAD_KEYS

    return tuple(HEAD_KEYS)


def _inference_keys() -> tuple[str, ...]:
    from setr.inference import INFERENCE_KEYS

    return tuple(INFERENCE_KEYS)


# node -> the keys its readers take (a callable: looked up when needed). The top level ("") is handled apart.
CLOSED: dict[str, tuple[str, ...] | Callable[[], tuple[str, ...]]] = {
    "optimizer": OPTIMIZER_KEYS,
    "optimizer.scheduler": SCHEDULER_KEYS,
    "data": DATA_KEYS,
    "data.inference": _inference_keys,
    "trainer": _trainer_keys,
    "model": MODEL_KEYS,
    "model.encoder": _encoder_keys,
    "model.head": _head_keys,
    "extras": EXTRAS_KEYS,
}


def task_overrides() -> list[str] | None:
    """The command line's config overrides of this Hydra job (None outside a Hydra job)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return None
    return list(HydraConfig.get().overrides.task)


def _groups() -> set[str]:
    """Config groups chosen in this job (``model/encoder``, ``experiment``, ...): ``+group=option`` adds one."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return set()
    return {str(k).replace("/", ".") for k in HydraConfig.get().runtime.choices}


def _primary_keys() -> list[str]:
    """Top-level keys of the task's own config file (``conf/<task>.yaml``): ``+key=value`` may set one of them
    that is null, so a ``+`` key at the top level is not always new."""
    from hydra.core.hydra_config import HydraConfig
    from omegaconf.errors import OmegaConfBaseException

    if not HydraConfig.initialized():
        return []
    hc = HydraConfig.get()
    keys: list[str] = []
    for src in hc.runtime.config_sources:
        if src.schema != "file":
            continue
        path = f"{src.path}/{hc.job.config_name}.yaml"
        try:
            node = OmegaConf.load(path)
        except (OSError, OmegaConfBaseException):
            continue
        if isinstance(node, DictConfig):
            keys += [str(k) for k in node if k != "defaults"]
    return keys


def added_keys(overrides: Iterable[str]) -> list[str]:
    """The keys that ``+key=value`` overrides add (group selections and package forms left out)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import OverrideType

    out = []
    groups = _groups()
    for ov in OverridesParser.create().parse_overrides(list(overrides)):
        if ov.type is not OverrideType.ADD or ov.package is not None:
            continue
        key = ov.key_or_group
        if key in groups or key.replace("/", ".") in groups or "/" in key:
            continue
        out.append(key)
    return out


def check_added_keys(cfg: DictConfig, overrides: Iterable[str] | None = None) -> None:
    """Refuse a ``+key`` that nothing reads: under a :data:`CLOSED` node a key its readers do not take, at the
    top level a key the task's config does not have (nor :data:`ROOT_OPTIONAL`). One line naming the key and the
    nearest known one. ``overrides``: the command line's (default: this Hydra job's)."""
    if overrides is None:
        overrides = task_overrides()
        if overrides is None:
            return
    added = added_keys(overrides)
    if not added:
        return
    new_top = {k for k in added if "." not in k} - set(_primary_keys())  # Hydra lets `+` set a null key
    for key in added:
        parent, _, leaf = key.rpartition(".")
        if parent == "":
            known: Iterable[str] = [k for k in cfg if k not in new_top and k != "hydra"] + list(ROOT_OPTIONAL)
        elif parent in CLOSED:
            entry = CLOSED[parent]
            known = entry() if callable(entry) else entry
        else:
            continue  # callbacks, logger, paths, dataset arguments, ...: open, or checked by their readers
        known = list(known)
        if leaf in known:
            continue
        near = difflib.get_close_matches(leaf, known, n=1)
        where = f"{parent}." if parent else ""
        hint = f"; did you mean {where}{near[0]}?" if near else f"; known keys: {', '.join(sorted(known))}"
        raise SETRConfigError(f"{key}: unknown key (added with +, but nothing reads it){hint}")


def check_schema(cfg: DictConfig, overrides: Iterable[str] | None = None) -> None:
    """``+`` keys first (a typo there is the cause of what follows), then the typed table."""
    check_added_keys(cfg, overrides)
    check_types(cfg)


def first_missing(cfg: Mapping[str, Any], skip: Iterable[str] = ("hydra",)) -> str | None:
    """The first mandatory (``???``) key of ``cfg`` left unset, as a dotted path (None when there is none)."""
    if not isinstance(cfg, DictConfig):
        return None
    skip = set(skip)
    for key in cfg:
        if key in skip:
            continue
        if OmegaConf.is_missing(cfg, key):
            return str(key)
        node = cfg._get_node(key)
        if isinstance(node, DictConfig) and not node._is_interpolation():
            inner = first_missing(node, ())
            if inner:
                return f"{key}.{inner}"
    return None
