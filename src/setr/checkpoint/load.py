"""The one loader: a checkpoint file -> :class:`Checkpoint` (weights + record) -> the SETR network.

:func:`read_checkpoint` reads every file a user can point ``ckpt_path`` at, through the one safe reader
(:mod:`setr.files`):

* a checkpoint of this project: ``.ckpt`` of ``setr-train`` (``hyper_parameters.record`` + ``state_dict`` under
  ``model.``), the same written by ``setr-convert``, or ``.safetensors`` of ``setr-convert`` (the weights, the record
  as JSON in the metadata);
* a released SETR checkpoint (the official fudan-zvg/SETR code or mmsegmentation 0.x / 1.x), converted in memory
  with ``setr-convert``'s defaults (:mod:`setr.checkpoint.convert`; ``data`` and ``convert`` stand for its flags),
  with one printed line saying so.

:func:`load_model` builds the network from it (no Lightning): ``setr.load_model``, ``setr-predict``,
``setr-export`` and the notebooks call it; ``setr-eval`` puts the same :class:`Checkpoint` into its Lightning module
(:meth:`Checkpoint.load_into`).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from setr.checkpoint.record import ModelRecord, record_of
from setr.errors import SETRConfigError
from setr.files import read_safetensors_file, read_torch_file


def strip_compile_prefix(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """Drop ``_orig_mod.`` (left by ``torch.compile``) from state-dict keys."""
    return {k.replace("_orig_mod.", ""): v for k, v in state_dict.items()}


def network_state(state_dict: Mapping[str, Any], prefix: str = "model.") -> dict[str, torch.Tensor]:
    """The network's weights out of a Lightning module's state dict (keys under ``model.``)."""
    state = strip_compile_prefix(state_dict)
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


@dataclasses.dataclass
class Checkpoint:
    """A checkpoint file as read: the network's weights (no ``model.`` prefix), its :class:`ModelRecord`, the
    file's hyperparameters (``optimizer``, ``converted_from``, ...) and whether it is a released checkpoint that was
    converted in memory just now (its record's data settings are then the ``data`` given to the reader)."""

    path: Path
    weights: dict[str, torch.Tensor]
    record: ModelRecord
    hyper_parameters: dict[str, Any]
    converted_now: bool = False

    def load_into(self, model: torch.nn.Module) -> torch.nn.Module:
        """Load the weights into ``model`` strictly; one line naming the file when they do not fit."""
        try:
            model.load_state_dict(self.weights)
        except RuntimeError as e:
            first = " ".join(str(e).split())[:300]
            raise SETRConfigError(f"ckpt_path: {self.path}: weights do not fit the record's model ({first})") from e
        return model

    def build(self, map_location: str | torch.device = "cpu") -> torch.nn.Module:
        """The SETR network of the record with these weights, in eval mode, the record as ``model.record``."""
        from setr.models import build_setr

        model = self.load_into(build_setr(self.record.model))
        model.record = self.record
        return model.to(map_location).eval()


def _from_dict(ckpt: Mapping[str, Any], path: Path, converted_now: bool = False) -> Checkpoint:
    if not isinstance(ckpt, Mapping) or not isinstance(ckpt.get("state_dict"), Mapping):
        raise SETRConfigError(f"ckpt_path: {path} is not a checkpoint written by setr-train (no state_dict)")
    return Checkpoint(path=path, weights=network_state(ckpt["state_dict"]), record=record_of(ckpt, path),
                      hyper_parameters=dict(ckpt.get("hyper_parameters") or {}), converted_now=converted_now)


def _from_safetensors(path: Path, map_location: str | torch.device) -> Checkpoint:
    state, meta = read_safetensors_file(path)
    if "setr_record" not in meta:
        raise SETRConfigError(f"ckpt_path: {path} has no setr_record metadata (write it with setr-convert)")
    try:
        record = json.loads(meta["setr_record"])
    except json.JSONDecodeError as e:
        raise SETRConfigError(f"ckpt_path: {path}: setr_record metadata is not valid JSON ({e})") from e
    state = {f"model.{k}": v.to(map_location) for k, v in state.items()}
    return _from_dict({"hyper_parameters": {"record": record}, "state_dict": state}, path)


def read_checkpoint(path: str | Path, map_location: str | torch.device = "cpu", *,
                    data: str | Mapping[str, Any] | None = None,
                    convert: Mapping[str, Any] | None = None) -> Checkpoint:
    """Any checkpoint file a user can name (see the module doc) as a :class:`Checkpoint`; one
    :class:`SETRConfigError` line naming the file when it is missing, unreadable, foreign or refused.

    ``data`` (a data preset name or a composed data config: classes, palette, inference and test resize) and
    ``convert`` (``num_heads``, ``out_indices`` and ``data``, a preset name used when ``data`` is not given: the
    entry points' ``convert.*`` keys) apply to a released SETR checkpoint only, as ``setr-convert``'s flags."""
    from setr.checkpoint.convert import convert_checkpoint, summary_line
    from setr.checkpoint.released import is_released

    path = Path(path).expanduser()
    if path.suffix == ".safetensors":
        return _from_safetensors(path, map_location)
    obj = read_torch_file(path, map_location=map_location)
    if not is_released(obj):
        return _from_dict(obj, path)
    convert = dict(convert or {})
    data = data if data is not None else convert.get("data")
    try:
        ckpt, conv = convert_checkpoint(obj, where=str(path), data=data, num_heads=convert.get("num_heads"),
                                        out_indices=convert.get("out_indices"))
    except SETRConfigError as e:  # the converter's flags are the entry points' convert.* keys here
        msg = str(e).replace("--out-indices a,b,c,d", "convert.out_indices=[a,b,c,d]")
        msg = msg.replace("--out-indices", "convert.out_indices").replace("--num-heads", "convert.num_heads")
        raise SETRConfigError(msg) from e
    print(f"converted in memory (setr-convert defaults): {summary_line(conv, path)}", flush=True)
    return _from_dict(ckpt, path, converted_now=True)


def load_model(path: str | Path, map_location: str | torch.device = "cpu", *,
               data: str | Mapping[str, Any] | None = None,
               convert: Mapping[str, Any] | None = None) -> torch.nn.Module:
    """The SETR network of a checkpoint, in eval mode, with its :class:`ModelRecord` as ``model.record``.

    ``path``: a ``.ckpt`` of ``setr-train`` or ``setr-convert``, a ``.safetensors`` of ``setr-convert``, or a
    released SETR checkpoint (official or mmsegmentation), converted in memory (``data`` / ``convert``: see
    :func:`read_checkpoint`). No Lightning involved. Works at any input size (SETR resamples its position
    embeddings and pads to the patch size)."""
    return read_checkpoint(path, map_location, data=data, convert=convert).build(map_location)
