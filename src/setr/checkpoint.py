"""What a SETR checkpoint carries besides its weights, and loading a network from one without Lightning.

:class:`ModelRecord` is the one typed record of everything needed to use trained weights: the model config that
:func:`setr.models.build_setr` turns into the network, the class names and palette, the normalisation, the ignore
index, the training crop, the inference settings of validation, and the test-time resize. Training stores it in
the checkpoint's hyperparameters (``SETRModule(record=...)``), so ``setr.load_model(path)``, prediction, export,
the W&B callback and the notebooks all read the same thing, and a checkpoint needs no config file beside it.

Checkpoints are read with ``torch.load(weights_only=True)``: they hold tensors and plain Python values only.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from setr.errors import SETRConfigError
from setr.utils.config import plain

IGNORE_INDEX = 255
IMAGENET_MEAN_255 = (123.675, 116.28, 103.53)
IMAGENET_STD_255 = (58.395, 57.12, 57.375)


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
        self.test_pipeline = [dict(s) for s in (plain(self.test_pipeline) or [])]

    @property
    def num_classes(self) -> int:
        return int(self.model["num_classes"])

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str = "record") -> ModelRecord:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise SETRConfigError(f"{where}: unknown field(s) {unknown}; a record has {', '.join(sorted(names))}")
        if "model" not in d:
            raise SETRConfigError(f"{where}: no model config")
        return cls(**{k: v for k, v in d.items() if k in names})

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


# ---------------------------------------------------------------------------------------------- reading
def read_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """``torch.load`` of a file this project wrote, as tensors and plain values only (``weights_only=True``).
    A missing, unreadable or foreign file raises one :class:`SETRConfigError` line naming it."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise SETRConfigError(f"ckpt_path: checkpoint {path} not found")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        reason = (str(e).strip().splitlines() or [""])[0]
        if "weights_only" in str(e) or "Unsupported global" in str(e):
            reason = "it holds Python objects beyond tensors and plain values, which are not unpickled"
        raise SETRConfigError(f"ckpt_path: cannot read checkpoint {path} ({type(e).__name__}: {reason})") from e
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise SETRConfigError(f"ckpt_path: {path} is not a checkpoint written by src/train.py (no state_dict)")
    return ckpt


def record_of(ckpt: Mapping[str, Any], path: str | Path = "checkpoint") -> ModelRecord:
    """The :class:`ModelRecord` of a checkpoint dict (``hyper_parameters.record``)."""
    hp = ckpt.get("hyper_parameters") or {}
    if "record" not in hp:
        raise SETRConfigError(f"ckpt_path: {path} is not a checkpoint written by src/train.py (no model record)")
    return ModelRecord.from_dict(hp["record"], where=f"ckpt_path: {path}: record")


def strip_compile_prefix(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """Drop ``_orig_mod.`` (left by ``torch.compile``) from state-dict keys."""
    return {k.replace("_orig_mod.", ""): v for k, v in state_dict.items()}


def network_state(state_dict: Mapping[str, Any], prefix: str = "model.") -> dict[str, torch.Tensor]:
    """The network's weights out of a Lightning module's state dict (keys under ``model.``)."""
    state = strip_compile_prefix(state_dict)
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def load_model(path: str | Path, map_location: str | torch.device = "cpu") -> torch.nn.Module:
    """The SETR network of a checkpoint, in eval mode, with its :class:`ModelRecord` as ``model.record``.

    No Lightning involved: the record rebuilds the network, the weights are loaded strictly. Works at any input
    size (SETR resamples its position embeddings and pads to the patch size)."""
    from setr.models import build_setr

    ckpt = read_checkpoint(path, map_location)
    record = record_of(ckpt, path)
    model = build_setr(record.model)
    try:
        model.load_state_dict(network_state(ckpt["state_dict"]))
    except RuntimeError as e:
        first = " ".join(str(e).split())[:300]
        raise SETRConfigError(f"ckpt_path: {path}: weights do not fit the record's model ({first})") from e
    model.record = record
    return model.to(map_location).eval()
