"""The model record: what a SETR checkpoint carries besides its weights.

:class:`ModelRecord` is the one typed record of everything needed to use trained weights: the model config that
:func:`setr.models.build_setr` turns into the network, the class names and palette, the normalisation, the ignore
index, the training crop, the inference settings of validation, and the test-time resize. Training stores it in
the checkpoint's hyperparameters (``SETRModule(record=...)``), so ``setr.load_model(path)``, evaluation, prediction,
export, the W&B callback and the notebooks all read the same thing, and a checkpoint needs no config file beside it.

Old checkpoints keep loading: a record carries its schema ``version`` (:data:`RECORD_VERSION`; none: version 1) and
the class paths it names (the ``_target_`` of its test-time resize steps) are read through :data:`TARGET_ALIASES`,
so a class that moves gets one line there instead of breaking every checkpoint written before the move.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

from setr.errors import SETRConfigError
from setr.nodes import plain
from setr.values import IGNORE_INDEX, IMAGENET_MEAN_255, IMAGENET_STD_255

# the schema version written into every record; raise it when a field changes meaning, and read the old one in
# ModelRecord.from_dict
RECORD_VERSION = 1

# class paths stored in records written before a class moved -> where it is now (the ``_target_`` of
# ``test_pipeline`` steps). Empty while no such class has moved; add "old.module.Class": "new.module.Class".
TARGET_ALIASES: dict[str, str] = {}


def _current_target(step: dict[str, Any]) -> dict[str, Any]:
    """``step`` with its ``_target_`` read through :data:`TARGET_ALIASES`."""
    target = step.get("_target_")
    if isinstance(target, str) and target in TARGET_ALIASES:
        step["_target_"] = TARGET_ALIASES[target]
    return step


def _version(v: Any) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or not 1 <= v <= RECORD_VERSION:
        raise SETRConfigError(f"record.version: expected an integer from 1 to {RECORD_VERSION}, got {v!r}")
    return v


@dataclasses.dataclass
class ModelRecord:
    """Everything a checkpoint carries besides the weights.

    Attributes:
        model: the ``model`` config mapping for :func:`setr.models.build_setr` (``num_classes`` included;
            ``encoder.pretrained`` removed: trained weights never point back at an ImageNet file).
        class_names: one name per class, in id order.
        palette: one ``[r, g, b]`` per class (label PNGs, overlays, W&B masks).
        mean, std: normalisation on the 0..255 scale: the network sees ``(pixel - mean) / std``.
        ignore_index: the label value that is never scored.
        crop_size: the training crop ``[height, width]`` (the size the position embeddings were built for).
        inference: the ``data.inference`` node validation ran with (``mode``, ``crop_size``, ``stride``, ...).
        test_pipeline: the test-time resize: the data config's ``val_pipeline`` steps (``_target_`` mappings,
            geometric only, e.g. ADE20K's keep-ratio 2048x512), applied to the image before inference; logits
            are resized back to the image's own size. Empty: images run at their own size.
        version: the record's schema version (:data:`RECORD_VERSION` when written; a record without one is
            version 1, the first layout).
    """

    model: dict[str, Any]
    class_names: list[str]
    palette: list[list[int]]
    mean: list[float] = dataclasses.field(default_factory=lambda: list(IMAGENET_MEAN_255))
    std: list[float] = dataclasses.field(default_factory=lambda: list(IMAGENET_STD_255))
    ignore_index: int = IGNORE_INDEX
    crop_size: list[int] = dataclasses.field(default_factory=lambda: [512, 512])
    inference: dict[str, Any] = dataclasses.field(default_factory=lambda: {"mode": "whole"})
    test_pipeline: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    version: int = RECORD_VERSION

    def __post_init__(self) -> None:
        self.model = dict(plain(self.model) or {})
        encoder = dict(self.model.get("encoder") or {})
        encoder.pop("pretrained", None)
        if encoder:
            self.model["encoder"] = encoder
        n = self.model.get("num_classes")
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise SETRConfigError(f"record.model.num_classes: expected a positive integer, got {n!r}")
        self.class_names = [str(c) for c in (plain(self.class_names) or [f"class_{i}" for i in range(n)])]
        if len(self.class_names) != n:
            raise SETRConfigError(f"data.class_names: {len(self.class_names)} names for {n} classes")
        from setr.data.base import default_palette

        palette = plain(self.palette) or default_palette(n)
        self.palette = [[int(v) for v in c] for c in palette]
        if len(self.palette) < n or any(len(c) != 3 for c in self.palette):
            raise SETRConfigError(f"record.palette: expected {n} [r, g, b] colours, got {self.palette[:3]}...")
        self.mean, self.std = _three(self.mean, "mean"), _three(self.std, "std")
        self.ignore_index = int(self.ignore_index)
        crop = plain(self.crop_size)
        self.crop_size = [int(crop), int(crop)] if isinstance(crop, int) else [int(c) for c in crop]
        if len(self.crop_size) != 2 or min(self.crop_size) < 1:
            raise SETRConfigError(f"data.crop_size: expected a size or [height, width], got {crop!r}")
        self.inference = dict(plain(self.inference) or {"mode": "whole"})
        self.test_pipeline = [_current_target(dict(s)) for s in (plain(self.test_pipeline) or [])]
        self.version = _version(self.version)

    @property
    def num_classes(self) -> int:
        return int(self.model["num_classes"])

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str = "record") -> ModelRecord:
        """The record of a dict (a checkpoint's ``hyper_parameters.record``): one line naming ``where`` for an
        unknown field, a missing model config or a record of a newer schema than this code reads."""
        names = {f.name for f in dataclasses.fields(cls)}
        d = dict(d)
        d.setdefault("version", 1)  # records written before the schema had a version: the first layout
        version = d["version"]
        if not isinstance(version, int) or isinstance(version, bool) or version < 1:
            raise SETRConfigError(f"{where}: version: expected a positive integer, got {version!r}")
        if version > RECORD_VERSION:
            raise SETRConfigError(f"{where}: written by a newer setr (record version {version}; this one reads up to "
                                  f"{RECORD_VERSION}): update setr to load it")
        unknown = sorted(set(d) - names)
        if unknown:
            raise SETRConfigError(f"{where}: unknown field(s) {unknown}; a record has {', '.join(sorted(names))}")
        if "model" not in d:
            raise SETRConfigError(f"{where}: no model config")
        # version 1 is the current layout: nothing to upgrade yet; the record read is now a current one
        return cls(**{**d, "version": RECORD_VERSION})

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any], class_names: Sequence[str] | None = None,
                    palette: Sequence[Sequence[int]] | None = None) -> ModelRecord:
        """The record of a run from its composed config (``model`` and ``data`` nodes); the dataset gives the
        class names and palette when the data config does not."""
        data, model = plain(cfg["data"]), dict(plain(cfg["model"]))
        model["num_classes"] = data["num_classes"]
        return cls(
            model=model,
            class_names=list(data.get("class_names") or class_names or []),
            palette=list(palette or []),
            mean=data.get("mean", IMAGENET_MEAN_255),
            std=data.get("std", IMAGENET_STD_255),
            ignore_index=data.get("ignore_index", IGNORE_INDEX),
            crop_size=data["crop_size"],
            inference=data.get("inference") or {"mode": "whole"},
            test_pipeline=data.get("val_pipeline") or [],
        )


def _three(values: Any, key: str) -> list[float]:
    values = [float(v) for v in plain(values)]
    if len(values) != 3:
        raise SETRConfigError(f"data.{key}: expected 3 values (R, G, B on the 0..255 scale), got {values}")
    return values


def record_of(ckpt: Mapping[str, Any], path: Any = "checkpoint") -> ModelRecord:
    """The :class:`ModelRecord` of a checkpoint dict (``hyper_parameters.record``)."""
    hp = ckpt.get("hyper_parameters") or {}
    if "record" not in hp:
        raise SETRConfigError(f"ckpt_path: {path} is not a checkpoint written by setr-train (no model record)")
    return ModelRecord.from_dict(hp["record"], where=f"ckpt_path: {path}: record")
