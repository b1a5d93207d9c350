"""Convert released SETR checkpoints into this project's format: ``setr-convert SRC DST [flags]`` (the same as
``python -m setr.convert``).

SRC: a checkpoint of the official code (fudan-zvg/SETR) or of mmsegmentation 0.x / 1.x (``{"meta": ..., "state_dict":
...}`` or a bare state dict). The network is read from the weights
(:func:`setr.checkpoint.released.convert_state_dict`); the rest of the :class:`~setr.checkpoint.ModelRecord` comes
from the file's ``meta`` (``CLASSES`` / ``PALETTE``, or mmseg 1.x ``dataset_meta``) and ``--data`` (class names and
palette when ``meta`` has none, the slide-inference settings and the test-time resize of that data preset); mean /
std are ImageNet's on 0..255, as every SETR recipe.

DST: ``*.ckpt`` / ``*.pth`` / ``*.pt``, a checkpoint as setr-train writes (``hyper_parameters.record`` +
``state_dict`` under ``model.``), or ``*.safetensors``: the network's weights with the record as JSON in the metadata
(``setr_record``). Both are read by ``setr.load_model``, ``setr-eval``, ``setr-predict`` and ``setr-export``, which
also convert a released file in memory (:func:`setr.checkpoint.read_checkpoint`).

SRC is read with ``torch.load(weights_only=True)`` (numpy arrays and dtypes allowed, as real mmseg ``meta`` may hold
them); a file that needs arbitrary unpickling is refused unless ``--trust-pickle`` is given.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from setr.checkpoint.record import ModelRecord
from setr.checkpoint.released import Converted, convert_state_dict, is_released, strip_module_prefix
from setr.errors import SETRConfigError
from setr.files import read_torch_file
from setr.nodes import plain
from setr.paths import conf_dir
from setr.values import IMAGENET_MEAN_255, IMAGENET_STD_255

DATA_PRESETS = ("ade20k", "cityscapes", "pascal_context", "pascal_context_59")


# ------------------------------------------------------------------------------------------ data presets
def data_preset(name: str) -> dict[str, Any]:
    """The resolved ``conf/data/<name>.yaml`` node (its ``defaults`` parent merged)."""
    from omegaconf import OmegaConf

    if name not in DATA_PRESETS:
        raise SETRConfigError(f"--data: unknown data preset {name!r}; choose one of {', '.join(DATA_PRESETS)}")

    def load(n: str):
        path = conf_dir() / "data" / f"{n}.yaml"
        if not path.is_file():
            raise SETRConfigError(f"--data: {path} not found")
        node = OmegaConf.load(path)
        parents = [d for d in node.pop("defaults", []) if isinstance(d, str) and d != "_self_"]
        return OmegaConf.merge(*[load(p) for p in parents], node)

    node = load(name)
    root = OmegaConf.create({"data": node, "paths": {"data_dir": "data"}})
    return OmegaConf.to_container(root, resolve=True)["data"]


def _meta_classes(meta: Mapping[str, Any]) -> tuple[list[str] | None, list[list[int]] | None]:
    """Class names and palette of an mmseg ``meta``: 0.x ``CLASSES`` / ``PALETTE``, 1.x ``dataset_meta``."""
    dm = meta.get("dataset_meta") if isinstance(meta.get("dataset_meta"), Mapping) else {}
    names = meta.get("CLASSES") if meta.get("CLASSES") is not None else dm.get("classes")
    palette = meta.get("PALETTE") if meta.get("PALETTE") is not None else dm.get("palette")
    tolist = lambda v: v.tolist() if hasattr(v, "tolist") else v  # numpy arrays in old meta
    names = [str(c) for c in tolist(names)] if names is not None else None
    palette = [[int(x) for x in tolist(c)] for c in tolist(palette)] if palette is not None else None
    return names, palette


def build_record(conv: Converted, meta: Mapping[str, Any] | None, data: str | Mapping[str, Any] | None,
                 where: str) -> ModelRecord:
    """The record of converted weights: classes / palette from ``meta`` or ``data``, inference and test resize from
    ``data`` (a preset name or a composed data config, whose ``class_names`` / ``palette`` may be callables, e.g. a
    data module's properties, called only here), ImageNet mean / std."""
    n = conv.num_classes
    names, palette = _meta_classes(meta or {})
    if names is not None and len(names) != n:
        raise SETRConfigError(f"{where}: meta lists {len(names)} classes but the classifier has {n} outputs")
    if palette is not None and len(palette) < n:
        palette = None
    inference: dict[str, Any] = {"mode": "whole"}
    pipeline: list[dict[str, Any]] = []
    if data is not None:
        node = data_preset(data) if isinstance(data, str) else dict(plain(data))
        label = data if isinstance(data, str) else f"data={node.get('name')}"
        if int(node.get("num_classes") or n) != n:
            raise SETRConfigError(f"--data: {label} has {node.get('num_classes')} classes, the checkpoint predicts {n}")
        from setr.data import DATASETS

        ds = DATASETS.get(str(node.get("name")))
        value = lambda v: v() if callable(v) else v
        if names is None:
            names = list(value(node.get("class_names")) or getattr(ds, "class_names", None) or []) or None
        if palette is None:
            palette = [list(c) for c in value(node.get("palette")) or getattr(ds, "palette", None) or []] or None
        inference = dict(node.get("inference") or inference)
        if inference.get("mode") == "slide":
            preset_crop = inference.get("crop_size") or node.get("crop_size") or conv.crop
            preset_crop = preset_crop[0] if isinstance(preset_crop, Sequence) else int(preset_crop)
            stride = inference.get("stride") or (2 * conv.crop + 2) // 3
            stride = stride[0] if isinstance(stride, Sequence) else int(stride)
            if preset_crop != conv.crop:  # the preset's stride / crop ratio at the weights' crop
                stride = max(1, round(stride * conv.crop / preset_crop))
            inference.update(crop_size=conv.crop, stride=stride)
        pipeline = list(node.get("val_pipeline") or [])
    return ModelRecord(model=conv.model, class_names=names or [], palette=palette or [],
                       mean=list(IMAGENET_MEAN_255), std=list(IMAGENET_STD_255), crop_size=conv.crop,
                       inference=inference, test_pipeline=pipeline)


# ------------------------------------------------------------------------------------------- conversion
def split_released(obj: Any, where: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(state dict, meta) of a loaded released file: ``{"meta", "state_dict"}`` or a bare state dict."""
    if not isinstance(obj, Mapping):
        raise SETRConfigError(f"{where}: not a checkpoint (a {type(obj).__name__}, expected a dict)")
    sd = obj.get("state_dict") if isinstance(obj.get("state_dict"), Mapping) else obj
    meta = obj.get("meta") if isinstance(obj.get("meta"), Mapping) else {}
    return strip_module_prefix(sd), dict(meta)


def convert_checkpoint(obj: Any, *, where: str = "checkpoint", data: str | Mapping[str, Any] | None = None,
                       num_heads: int | None = None, out_indices: Sequence[int] | None = None
                       ) -> tuple[dict[str, Any], Converted]:
    """A loaded released checkpoint -> (this project's checkpoint dict, :class:`Converted`). The weights are checked
    against the network the record builds (strict, shapes included)."""
    from setr.models import build_setr

    sd, meta = split_released(obj, where)
    conv = convert_state_dict(sd, num_heads=num_heads, out_indices=out_indices, where=where)
    record = build_record(conv, meta, data, where)
    model = build_setr(record.model)
    own = model.state_dict()
    state = dict(conv.state_dict)
    for k, v in own.items():  # BN counters are not always saved; they never change the output
        if k.endswith("num_batches_tracked") and k not in state:
            state[k] = torch.zeros_like(v)
    missing = [k for k in own if k not in state]
    extra = [k for k in state if k not in own]
    bad = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
           if k in state and state[k].shape != v.shape]
    if missing or extra or bad:
        detail = "; ".join(filter(None, [missing and f"missing {missing[:2]}", extra and f"unexpected {extra[:2]}",
                                         bad and f"shape {bad[0]}"]))
        raise SETRConfigError(f"{where}: the converted weights do not fit the {conv.head} network ({detail})")
    state = {k: state[k].detach().to(own[k].dtype if own[k].is_floating_point() else state[k].dtype).contiguous()
             for k in own}
    conv.state_dict = state
    ckpt = {"hyper_parameters": {"record": record.to_dict(), "optimizer": None,
                                 "converted_from": {**conv.summary(), "source": str(where)}},
            "state_dict": {f"model.{k}": v for k, v in state.items()}}
    return ckpt, conv


def summary_line(conv: Converted, src: str | Path, dst: str | Path | None = None) -> str:
    """One line: head type, width, depth, classes, crop, out_indices, aux heads, tensors mapped, dropped."""
    dropped = ", ".join(conv.dropped) if conv.dropped else "none"
    to = f" -> {dst}" if dst is not None else ""
    return (f"{src}{to}: {conv.layout} {conv.head}, embed_dim {conv.embed_dim}, depth {conv.depth}, "
            f"heads {conv.num_heads}, {conv.num_classes} classes, crop {conv.crop}, out_indices "
            f"{','.join(map(str, conv.out_indices))}, {conv.aux_heads} aux heads, {conv.mapped} tensors mapped, "
            f"dropped: {dropped}")


def save_converted(ckpt: Mapping[str, Any], dst: str | Path) -> Path:
    """Write ``ckpt`` to ``dst``: ``.safetensors`` (weights + record JSON in the metadata) or a torch file."""
    dst = Path(dst).expanduser()
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.suffix == ".safetensors":
        from safetensors.torch import save_file

        state = {k[len("model."):]: v.contiguous() for k, v in ckpt["state_dict"].items()}
        hp = ckpt["hyper_parameters"]
        save_file(state, str(dst), metadata={"format": "pt", "setr_record": json.dumps(hp["record"]),
                                             "setr_converted_from": json.dumps(hp.get("converted_from") or {})})
    else:
        torch.save(dict(ckpt), dst)
    return dst


# ------------------------------------------------------------------------------------------------- CLI
def _int_list(text: str) -> list[int]:
    try:
        return [int(t) for t in text.replace(" ", "").split(",") if t != ""]
    except ValueError:
        raise SETRConfigError(f"--out-indices: expected comma-separated integers like 9,14,19,23, "
                              f"got {text!r}") from None


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="setr-convert",
        description="Convert a released SETR checkpoint (official fudan-zvg/SETR or mmsegmentation 0.x/1.x) into "
                    "this project's format. The network is read from the weights; the flags give what they cannot.")
    p.add_argument("src", help="released checkpoint (.pth)")
    p.add_argument("dst", help="output: .ckpt/.pth/.pt (src/train.py's format) or .safetensors")
    p.add_argument("--num-heads", type=int, default=None,
                   help="attention heads of the ViT (default from the width: 1024 -> 16, 768 -> 12)")
    p.add_argument("--out-indices", default=None,
                   help="0-based blocks the heads read, e.g. 9,14,19,23: auxiliary heads' blocks first, the decode "
                        "head's last (MLA: the four neck levels). Default at depth 24: 9,14,19,23 (Naive/PUP), "
                        "5,11,17,23 (MLA); required at other depths")
    p.add_argument("--data", default=None, metavar="|".join(DATA_PRESETS),
                   help="data preset: class names and palette when the file's meta has none, slide-inference "
                        "settings and test-time resize (default: meta's or numbered classes, whole inference)")
    p.add_argument("--trust-pickle", action="store_true",
                   help="load SRC with full unpickling (runs code stored in the file): only for files you trust")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        out_indices = _int_list(args.out_indices) if args.out_indices is not None else None
        src = Path(args.src).expanduser()
        obj = read_torch_file(src, what="SRC", trust_pickle=args.trust_pickle,
                              pickle_hint="pass --trust-pickle if you trust its source")
        if not is_released(obj):
            raise SETRConfigError(f"SRC: {src} is not a released SETR checkpoint (no official fudan-zvg/SETR or "
                                  "mmsegmentation keys: backbone.blocks/layers.N with decode_head.conv_0/mlahead/"
                                  "up_convs)")
        ckpt, conv = convert_checkpoint(obj, where=str(src), data=args.data, num_heads=args.num_heads,
                                        out_indices=out_indices)
        dst = save_converted(ckpt, args.dst)
    except SETRConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(summary_line(conv, src, dst), flush=True)
    print(json.dumps({**conv.summary(), "src": str(src), "dst": str(dst)}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
