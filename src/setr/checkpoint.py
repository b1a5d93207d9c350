"""What a SETR checkpoint carries besides its weights, and loading a network from one without Lightning.

:class:`ModelRecord` is the one typed record of everything needed to use trained weights: the model config that
:func:`setr.models.build_setr` turns into the network, the class names and palette, the normalisation, the ignore
index, the training crop, the inference settings of validation, and the test-time resize. Training stores it in
the checkpoint's hyperparameters (``SETRModule(record=...)``), so ``setr.load_model(path)``, prediction, export,
the W&B callback and the notebooks all read the same thing, and a checkpoint needs no config file beside it.

Every file is read without arbitrary unpickling: ``torch.load(weights_only=True)`` (tensors, plain Python values and,
for released mmseg files whose ``meta`` holds them, numpy arrays / dtypes / scalars) or safetensors (``.safetensors``:
the weights, with the record as JSON in the metadata, as ``python -m setr.convert`` writes). A released SETR
checkpoint (official fudan-zvg/SETR or mmsegmentation) is refused by :func:`load_model` with a hint to convert it;
:mod:`setr.convert` converts it, on disk or in memory (``src/eval.py``, ``src/predict.py``).
"""

from __future__ import annotations

import dataclasses
import json
import pickle
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from setr.errors import SETRConfigError
from setr.nodes import plain

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
def _numpy_safe_globals() -> list[Any]:
    """The numpy callables and types a pickled array, dtype or scalar needs (as in old mmseg ``meta``). They only
    build arrays / dtypes / scalars; an object array's items are unpickled by the same restricted unpickler."""
    import numpy as np

    try:
        from numpy._core import multiarray
    except ImportError:  # numpy < 2
        from numpy.core import multiarray  # type: ignore[no-redef]
    items: list[Any] = [np.ndarray, np.dtype]
    for mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
        items += [(multiarray._reconstruct, f"{mod}._reconstruct"), (multiarray.scalar, f"{mod}.scalar")]
    dtypes = getattr(np, "dtypes", None)
    if dtypes is not None:  # numpy >= 1.25: the class of each dtype instance (needed to BUILD it)
        items += [c for c in vars(dtypes).values() if isinstance(c, type) and issubclass(c, np.dtype)]
    return items


def _unsafe_globals(path: Path) -> list[str]:
    """The globals of a torch zip file that the weights-only unpickler would refuse (best effort)."""
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except Exception:
        return []
    allowed = {n if isinstance(n, str) else f"{n.__module__}.{n.__qualname__}"
               for n in (i[1] if isinstance(i, tuple) else i for i in _numpy_safe_globals())}
    return [n for n in names if n not in allowed]


class UnreadableCheckpoint(SETRConfigError):
    """A checkpoint file that is no readable torch file at all: empty, truncated (an interrupted write or copy),
    or something else (random bytes, a web page, a Git LFS pointer). :func:`load_torch_file` raises it, so a
    caller that has other checkpoints to fall back on (``resume=auto``) can tell it from a file that is read
    but refused."""


# the start of a legacy (pre-zip) torch file: torch.serialization.MAGIC_NUMBER pickled as a long (after the
# protocol header, and a FRAME opcode from pickle protocol 4 on)
_LEGACY_MAGIC = b"\x8a\nl\xfc\x9cF\xf9 j\xa8P\x19"


def checkpoint_damage(path: str | Path, error: BaseException | None = None) -> str | None:
    """Why ``path`` is no readable torch file, judged from the file itself (its size, first bytes and, for a zip
    archive, its directory: nothing is unpickled or read in full), or None when it looks like one. ``error``:
    what ``torch.load`` raised, for a legacy (pre-zip) file: anything but a refused global means it is damaged."""
    import zipfile

    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(64)
    except OSError as e:
        return f"it cannot be read ({e.strerror or e})"
    if size == 0:
        return "the file is empty (0 bytes: a write or copy that was cut short)"
    if head.startswith(b"PK"):
        try:
            with zipfile.ZipFile(path) as z:
                names = z.namelist()
        except (zipfile.BadZipFile, OSError, ValueError, EOFError):
            return (f"it is truncated or damaged ({size} bytes, a torch zip archive without its directory at the end: "
                    "what an interrupted write or copy leaves)")
        if not any(n == "data.pkl" or n.endswith("/data.pkl") for n in names):
            return "it is a zip archive but not a torch file (no data.pkl in it)"
        return None
    if _LEGACY_MAGIC in head[:32]:  # a real pickle refused for its globals raises UnpicklingError; else damage
        if error is not None and (not isinstance(error, pickle.UnpicklingError) or "truncated" in str(error)):
            return (f"it is truncated or damaged ({size} bytes, a legacy torch file that cannot be read to its end: "
                    f"an interrupted write or copy; {type(error).__name__})")
        return None
    if head.startswith(b"version https://git-lfs"):
        return "it is a Git LFS pointer, not the file itself (fetch it with git lfs pull)"
    if head.lstrip()[:1] == b"<":
        return "it is not a torch file but a text / HTML page (a failed download?)"
    if head[:1] == b"\x80":
        return "it is a Python pickle but not a torch file (torch.save writes a zip archive or a legacy torch file)"
    return f"it is not a torch file (no torch zip archive, no legacy torch file: it starts {head[:8].hex(' ')})"


def load_torch_file(path: str | Path, what: str = "ckpt_path", map_location: str | torch.device = "cpu",
                    trust_pickle: bool = False) -> Any:
    """``torch.load`` without arbitrary unpickling (``weights_only=True``, numpy arrays allowed), every failure one
    :class:`SETRConfigError` line naming ``what`` and the file:

    * missing: "not found";
    * no readable torch file (empty, truncated, random bytes, ...: :func:`checkpoint_damage`):
      :class:`UnreadableCheckpoint`, "is not a readable checkpoint: <why>";
    * a real torch file whose pickle needs more than tensors, plain values and numpy arrays: the globals it names
      and, only then, the ``--trust-pickle`` hint; ``trust_pickle=True`` (only ``python -m setr.convert
      --trust-pickle``) loads it with full unpickling on explicit request.

    ``src/eval.py``, ``src/predict.py``, export, conversion and training's ``ckpt_path=`` all read files here."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise SETRConfigError(f"{what}: checkpoint {path} not found")
    try:
        with torch.serialization.safe_globals(_numpy_safe_globals()):
            return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        damage = checkpoint_damage(path, e)
        if damage is not None:
            raise UnreadableCheckpoint(f"{what}: {path} is not a readable checkpoint: {damage}") from e
        if not isinstance(e, pickle.UnpicklingError):
            reason = (str(e).strip().splitlines() or [""])[0]
            raise SETRConfigError(f"{what}: cannot read checkpoint {path} ({type(e).__name__}: {reason})") from e
        if trust_pickle:
            try:
                return torch.load(path, map_location=map_location, weights_only=False)
            except Exception as e2:
                raise SETRConfigError(f"{what}: cannot read {path} even with --trust-pickle ({type(e2).__name__}: "
                                      f"{(str(e2).strip().splitlines() or [''])[0]})") from e2
        names = _unsafe_globals(path)
        if not names:
            m = re.search(r"GLOBAL ([\w.]+)|got (<class '[\w.]+'>)|function (\S+)", str(e))
            names = [next(g for g in m.groups() if g)] if m else []
        found = f" ({', '.join(names[:4])}{', ...' if len(names) > 4 else ''})" if names else ""
        hint = ("pass --trust-pickle if you trust its source" if what == "SRC" else
                "a released SETR checkpoint from a trusted source: python -m setr.convert SRC DST --trust-pickle")
        raise SETRConfigError(
            f"{what}: {path} needs arbitrary unpickling: it holds Python objects beyond tensors, plain values and "
            f"numpy arrays{found}, which are not unpickled (that could run code stored in the file); {hint}") from e


def read_safetensors(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """A ``.safetensors`` file of :mod:`setr.convert` as a checkpoint dict (record from the metadata, weights
    under ``model.``)."""
    from safetensors import safe_open

    path = Path(path).expanduser()
    if not path.is_file():
        raise SETRConfigError(f"ckpt_path: checkpoint {path} not found")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118  (safe_open is no dict)
    except Exception as e:
        reason = (str(e).strip().splitlines() or [""])[0]
        raise SETRConfigError(f"ckpt_path: cannot read safetensors file {path} ({type(e).__name__}: {reason})") from e
    if "setr_record" not in meta:
        raise SETRConfigError(f"ckpt_path: {path} has no setr_record metadata (write it with python -m setr.convert)")
    try:
        record = json.loads(meta["setr_record"])
    except json.JSONDecodeError as e:
        raise SETRConfigError(f"ckpt_path: {path}: setr_record metadata is not valid JSON ({e})") from e
    state = {f"model.{k}": v.to(map_location) for k, v in state.items()}
    return {"hyper_parameters": {"record": record}, "state_dict": state}


def read_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """A checkpoint file of this project as a dict (``hyper_parameters.record`` + ``state_dict``), read without
    arbitrary unpickling (see :func:`load_torch_file`) or from ``.safetensors``. A missing, unreadable or foreign
    file raises one :class:`SETRConfigError` line naming it; a released SETR checkpoint (official or mmsegmentation
    layout) one that names the command converting it (:mod:`setr.convert`, which also reads them directly)."""
    path = Path(path).expanduser()
    if path.suffix == ".safetensors":
        return read_safetensors(path, map_location)
    return own_checkpoint(load_torch_file(path, map_location=map_location), path)


def own_checkpoint(obj: Any, path: str | Path) -> dict[str, Any]:
    """``obj`` (a loaded file) when it is a checkpoint of this project; else one line saying what it is."""
    from setr.models.convert import is_released

    if is_released(obj):
        raise SETRConfigError(f"ckpt_path: {path} is a released SETR checkpoint (official / mmsegmentation "
                              "layout); convert it with python -m setr.convert SRC DST")
    if not isinstance(obj, dict) or "state_dict" not in obj:
        raise SETRConfigError(f"ckpt_path: {path} is not a checkpoint written by src/train.py (no state_dict)")
    return obj


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


def model_from_checkpoint(ckpt: Mapping[str, Any], path: str | Path = "checkpoint",
                          map_location: str | torch.device = "cpu") -> torch.nn.Module:
    """The SETR network of a checkpoint dict, in eval mode, with its :class:`ModelRecord` as ``model.record``: the
    record rebuilds the network, the weights are loaded strictly."""
    from setr.models import build_setr

    record = record_of(ckpt, path)
    model = build_setr(record.model)
    try:
        model.load_state_dict(network_state(ckpt["state_dict"]))
    except RuntimeError as e:
        first = " ".join(str(e).split())[:300]
        raise SETRConfigError(f"ckpt_path: {path}: weights do not fit the record's model ({first})") from e
    model.record = record
    return model.to(map_location).eval()


def load_model(path: str | Path, map_location: str | torch.device = "cpu") -> torch.nn.Module:
    """The SETR network of a checkpoint (``.ckpt`` of src/train.py or setr.convert, or ``.safetensors`` of
    setr.convert), in eval mode, with its :class:`ModelRecord` as ``model.record``.

    No Lightning involved. Works at any input size (SETR resamples its position embeddings and pads to the patch
    size). A released SETR checkpoint is refused with the command that converts it
    (:func:`setr.convert.load_model_or_convert` converts it in memory)."""
    return model_from_checkpoint(read_checkpoint(path, map_location), path, map_location)
