"""``setr-export`` (``src/export.py``, ``python -m setr.export``): a checkpoint to ONNX or TorchScript for deployment.

The checkpoint is one of ``setr-train`` / ``setr-convert``, or a released SETR checkpoint (official fudan-zvg/SETR or
mmsegmentation), converted in memory as ``setr-eval`` and ``setr-predict`` do (``convert.*`` keys).

    python src/export.py ckpt_path=logs/train/runs/<run>/checkpoints/last.ckpt            # -> last.onnx
    python src/export.py ckpt_path=... format=torchscript                                # -> last.pt
    python src/export.py ckpt_path=... output=setr.onnx height=512 width=1024 dynamic=false check=false

Keys (``conf/export.yaml``): ``ckpt_path`` (required), ``format`` (``onnx`` | ``torchscript``), ``output``
(default: next to the checkpoint, ``<stem>.onnx`` / ``<stem>.pt``), ``height`` / ``width`` of the example input
(default: the checkpoint's crop size), ``dynamic`` (default true: batch, height and width are free), ``check``
(default true: run the exported file on random inputs and compare with PyTorch), and for ONNX only ``exporter``
(``dynamo`` = ``torch.export``, the default, or ``legacy`` = the TorchScript-based exporter, much quicker) and
``opset`` (default 18 for ``dynamo``, which writes 18..23; 17 for ``legacy``, 7..20).

The exported graph is SETR's eval forward: input ``image`` float32 ``(B, 3, H, W)``, RGB normalised as
``(pixel - mean) / std`` on the 0..255 scale; output ``logits`` float32 ``(B, num_classes, H, W)``. The
checkpoint's :class:`~setr.checkpoint.ModelRecord` gives mean, std, class names, palette, crop, inference settings
and test-time resize, stored in the ONNX ``metadata_props`` (and in the TorchScript file as the extra file
``setr_meta.json``). Only the whole-image forward is exported: slide / multi-scale inference and the test-time
resize are the deployer's code around it, from that metadata.

Dynamic sizes. Tracers (``torch.jit.trace``, both ONNX exporters) record one branch of every Python ``if`` on
the input shape. The model takes care of that itself (``setr.models.encoder.is_tracing``): while traced it
always resamples the position embeddings and always pads to a multiple of the patch size (both exact no-ops at
the built size), so the exported graph works at every size. The check compares the file with PyTorch at the
export size and, for a dynamic export, at two other sizes, one of them not a multiple of 16. A dynamic export
whose input came out with a fixed size is refused and its file removed; so is an exporter that cannot export the
encoder (:func:`check_exportable`: the legacy exporter and EVA-02's interleaved rotary embeddings), in one line
naming what to use instead.

The last stdout line is one JSON object (``format``, ``output``, ``dynamic``, ``max_abs_diff``, ...). A bad value
or a missing or foreign checkpoint: one ``error:`` line on stderr, exit code 2; a file that differs from PyTorch
beyond tolerance: exit code 1 after the JSON line.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from setr.errors import SETRConfigError
from setr.utils.launch import task_wrapper
from setr.utils.output import print_last_line

if TYPE_CHECKING:
    from setr.checkpoint import ModelRecord

FORMATS = ("onnx", "torchscript")
EXPORTERS = ("dynamo", "legacy")
SUFFIX = {"onnx": ".onnx", "torchscript": ".pt"}
DEFAULT_EXPORTER = "dynamo"
DEFAULT_OPSET = {"dynamo": 18, "legacy": 17}
OPSET_RANGE = {"dynamo": (18, 23), "legacy": (7, 20)}  # torch.onnx: dynamo cannot down-convert below 18
INPUT_NAME, OUTPUT_NAME = "image", "logits"
DYNAMIC_AXES = {0: "batch", 2: "height", 3: "width"}  # axis of the input / output -> its name in a dynamic export
OPTIONS = ("format", "output", "height", "width", "opset", "exporter", "dynamic", "check")


# ------------------------------------------------------------------------------------------- options
def check_options(format: str = "onnx", output: Any = None, height: Any = None, width: Any = None,
                  opset: Any = None, exporter: str = DEFAULT_EXPORTER, dynamic: Any = True,
                  check: Any = True) -> None:
    """Every option's value, one :class:`SETRConfigError` line for the first bad one. Runs before the
    checkpoint is read, so a typo costs no model load."""
    if format not in FORMATS:
        raise SETRConfigError(f"format: unknown format {format!r}; choose one of {', '.join(FORMATS)}")
    if exporter not in EXPORTERS:
        raise SETRConfigError(f"exporter: unknown exporter {exporter!r}; choose one of {', '.join(EXPORTERS)}")
    for key, value in (("dynamic", dynamic), ("check", check)):
        if not isinstance(value, bool):
            raise SETRConfigError(f"{key}: expected true or false, got {value!r}")
    for key, value in (("height", height), ("width", width)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise SETRConfigError(f"{key}: expected a positive integer or null, got {value!r}")
    if output is not None and (not isinstance(output, (str, Path)) or not str(output).strip()):
        raise SETRConfigError(f"output: expected a file path or null, got {output!r}")
    if format != "onnx" and (opset is not None or exporter != DEFAULT_EXPORTER):
        raise SETRConfigError(f"{'opset' if opset is not None else 'exporter'}: applies to format=onnx only")
    if opset is not None:
        if isinstance(opset, bool) or not isinstance(opset, int):
            raise SETRConfigError(f"opset: expected an integer or null, got {opset!r}")
        low, high = OPSET_RANGE[exporter]
        if not low <= opset <= high:
            hint = "; use exporter=legacy for an older opset" if exporter == "dynamo" and opset < low else ""
            raise SETRConfigError(f"opset: the {exporter} exporter writes opsets {low}..{high}, got {opset}{hint}")


def check_exportable(model, format: str, exporter: str) -> None:
    """Refuse, in one :class:`SETRConfigError` line naming the encoder and what to use instead, an exporter that
    cannot export the model's encoder (never a file that differs from PyTorch): the legacy ONNX exporter breaks on
    interleaved rotary embeddings (EVA-02's ``x[..., 1::2]`` rotation: its shape inference declares a 0-sized
    dimension, and onnxruntime refuses the file at every size)."""
    encoder = getattr(model, "encoder", None)
    if format != "onnx" or exporter != "legacy" or getattr(encoder, "rope", None) is None:
        return
    if any(getattr(getattr(b, "attn", None), "rotate_half", True) is False for b in encoder.vit.blocks):
        raise SETRConfigError(f"exporter: the legacy ONNX exporter cannot export encoder {encoder.name!r} "
                              "(interleaved rotary position embeddings); use exporter=dynamo (the default) "
                              "or format=torchscript")


def default_output(ckpt_path: str | Path, fmt: str) -> Path:
    """``<checkpoint stem>.onnx`` / ``.pt`` next to the checkpoint: the deployable file stays with its weights."""
    ckpt = Path(ckpt_path)
    return ckpt.with_name(ckpt.stem + SUFFIX[fmt])


def example_size(record: ModelRecord, height: int | None, width: int | None) -> tuple[int, int]:
    """The example input's ``(h, w)``: the training crop (the size the position embeddings were built for)."""
    ch, cw = record.crop_size
    return int(height or ch), int(width or cw)


def check_sizes(h: int, w: int, dynamic: bool) -> list[tuple[int, int, int]]:
    """``(batch, height, width)`` the check runs: the export size, and for a dynamic export two more sizes
    (another batch size; one of them not a multiple of 16)."""
    if not dynamic:
        return [(1, h, w)]
    return [(2, h, w), (1, h + 32, w + 16), (1, h + 21, w + 45)]


def metadata(record: ModelRecord) -> dict[str, str]:
    """The metadata stored with the exported file (string values, as ONNX ``metadata_props`` wants): what a
    deployer needs around the graph, from the checkpoint's record."""
    return {
        "input": f"{INPUT_NAME}: float32 (B, 3, H, W), RGB, (pixel - mean) / std with pixels on the 0..255 scale",
        "output": f"{OUTPUT_NAME}: float32 (B, num_classes, H, W); argmax over dim 1 is the label map",
        "mean": json.dumps(record.mean),
        "std": json.dumps(record.std),
        "num_classes": str(record.num_classes),
        "class_names": json.dumps(record.class_names),
        "palette": json.dumps(record.palette[: record.num_classes]),
        "ignore_index": str(record.ignore_index),
        "crop_size": json.dumps(record.crop_size),
        "inference": json.dumps(record.inference),
        "test_pipeline": json.dumps(record.test_pipeline),
    }


# ------------------------------------------------------------------------------------------- export
def export(ckpt_path: str | Path, format: str = "onnx", output: str | Path | None = None,
           height: int | None = None, width: int | None = None, opset: int | None = None,
           exporter: str = DEFAULT_EXPORTER, dynamic: bool = True, check: bool = True,
           convert: Mapping[str, Any] | None = None, log=print) -> dict[str, Any]:
    """Export ``ckpt_path`` (a checkpoint of this project, or a released SETR checkpoint converted in memory,
    ``convert`` giving ``setr-convert``'s flags: ``num_heads``, ``out_indices``, ``data``); returns the summary
    printed as the entry point's last line."""
    import torch

    from setr.checkpoint import load_model

    check_options(format, output, height, width, opset, exporter, dynamic, check)
    model = load_model(ckpt_path, convert=convert).float()  # one SETRConfigError line for a missing or foreign file
    check_exportable(model, format, exporter)
    record = model.record
    out = Path(output).expanduser() if output else default_output(ckpt_path, format)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SETRConfigError(f"output: cannot create the folder of {out} ({e.strerror or e})") from e
    h, w = example_size(record, height, width)
    sizes = check_sizes(h, w, dynamic)
    example = torch.randn(sizes[0][0], 3, h, w, generator=torch.Generator().manual_seed(0))
    props = metadata(record)
    t0 = time.perf_counter()
    info: dict[str, Any] = {}
    with torch.no_grad():
        if format == "onnx":
            info = _export_onnx(model, example, out, opset, exporter, dynamic, props)
        else:
            _export_torchscript(model, example, out, props)
    seconds = time.perf_counter() - t0
    what = f"onnx ({exporter} exporter, opset {info['opset']})" if format == "onnx" else "torchscript (torch.jit.trace)"
    log(f"exported {what} -> {out} ({out.stat().st_size / 2**20:.1f} MiB, {seconds:.1f} s)")
    free = "batch, height and width are dynamic" if dynamic else f"fixed size 1x3x{h}x{w} (dynamic=false)"
    log(f"input  {INPUT_NAME!r}: float32 (B, 3, H, W); {free}")
    log(f"  preprocessing: RGB, (pixel - mean) / std on the 0..255 scale; mean={props['mean']} std={props['std']}")
    names = record.class_names
    shown = ", ".join(names[:20]) + (f", ... ({len(names)} in all)" if len(names) > 20 else "")
    log(f"output {OUTPUT_NAME!r}: float32 (B, {record.num_classes}, H, W); classes: {shown}")
    log("  (stored in the ONNX metadata_props)" if format == "onnx" else "  (stored as the extra file setr_meta.json)")
    summary: dict[str, Any] = {
        "format": format, "output": str(out), "dynamic": bool(dynamic), "max_abs_diff": None,
        "example_size": [h, w], **({"exporter": exporter, "opset": info["opset"]} if format == "onnx" else {}),
        "num_classes": record.num_classes, "mean": record.mean, "std": record.std,
        "class_names": record.class_names, "seconds": round(seconds, 2),
    }
    if check:
        summary.update(_compare(model, out, format, sizes, log))
    return summary


def _compare(model, out: Path, format: str, sizes: list[tuple[int, int, int]], log) -> dict[str, Any]:
    """Run the exported file and the PyTorch model on the same random inputs at ``sizes``; the largest
    difference, judged against the size of the logits (float32 rounding grows with them)."""
    import torch

    run = _onnx_runner(out) if format == "onnx" else _torchscript_runner(out)
    diffs, scale = [], 0.0
    for i, (b, hh, ww) in enumerate(sizes):
        x = torch.randn(b, 3, hh, ww, generator=torch.Generator().manual_seed(i + 1))
        with torch.no_grad():
            ref = model(x)
        got = run(x)
        if tuple(got.shape) != tuple(ref.shape):
            raise RuntimeError(f"exported model returned {tuple(got.shape)} for {tuple(x.shape)}, "
                               f"PyTorch {tuple(ref.shape)}")
        diffs.append(float((got - ref).abs().max()))
        scale = max(scale, float(ref.abs().max()))
    worst = max(diffs)
    ok = worst <= 1e-3 * max(1.0, scale)
    runtime = "onnxruntime" if format == "onnx" else "torch.jit.load"
    log(f"check: max |{runtime} - pytorch| = {worst:.3g} over " + ", ".join(f"{b}x3x{a}x{c}" for b, a, c in sizes)
        + ("" if ok else f"  <-- MISMATCH (logits up to {scale:.3g})"))
    return {"max_abs_diff": worst, "check_sizes": [list(s) for s in sizes], "check_passed": ok}


def _export_onnx(model, example, out: Path, opset: int | None, exporter: str, dynamic: bool,
                 props: Mapping[str, str]) -> dict[str, Any]:
    import warnings

    import torch

    try:
        import onnx
    except ImportError:
        raise SETRConfigError("format: onnx needs the onnx packages (pip install -e '.[export]')") from None
    opset = opset or DEFAULT_OPSET[exporter]
    kwargs: dict[str, Any] = {"input_names": [INPUT_NAME], "output_names": [OUTPUT_NAME], "opset_version": opset}
    with warnings.catch_warnings():
        # the shape branches the tracer warns about run unconditionally while traced (setr.models.encoder.is_tracing)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        if exporter == "dynamo":
            try:
                import onnxscript  # noqa: F401
            except ImportError:
                raise SETRConfigError("exporter: dynamo needs onnxscript (pip install onnxscript), "
                                      "or use exporter=legacy") from None
            if dynamic:
                # Dim.AUTO, not named Dims: a named Dim refuses any guard torch.export adds on the size (the padding
                # to the patch, RoPE grids, the MLA neck add some), and torch.onnx then falls back to a FIXED input
                # size without a word. The axes are named (and checked to be free) below.
                kwargs["dynamic_shapes"] = (dict.fromkeys(DYNAMIC_AXES, torch.export.Dim.AUTO),)
            # one self-contained file unless the weights exceed protobuf's 2 GiB (then <output>.data beside it)
            nbytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
            external = nbytes > 1.8 * 2**30
            torch.onnx.export(model, (example,), str(out), dynamo=True, verbose=False, external_data=external,
                              **kwargs)
        else:
            if dynamic:
                kwargs["dynamic_axes"] = {INPUT_NAME: DYNAMIC_AXES, OUTPUT_NAME: DYNAMIC_AXES}
            torch.onnx.export(model, (example,), str(out), dynamo=False, **kwargs)
    proto = onnx.load(str(out), load_external_data=False)
    if dynamic:
        _name_dynamic_axes(proto, out, getattr(getattr(model, "encoder", None), "name", "?"), exporter)
    del proto.metadata_props[:]
    for key, value in props.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    proto.doc_string = "SETR semantic segmentation: " + props["input"] + " -> " + props["output"]
    onnx.save(proto, str(out))
    opsets = [o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")]
    return {"opset": opsets[0] if opsets else opset}


def _name_dynamic_axes(proto, out: Path, encoder: str, exporter: str = DEFAULT_EXPORTER) -> None:
    """Name the input's and output's free axes ``batch`` / ``height`` / ``width`` (``torch.export`` calls them
    ``s0``, ``s1``, ...). An axis the exporter fixed, or height and width tied to one size, is refused in one line
    and the file removed: it would refuse (or mis-handle) other sizes in deployment."""
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    params = {axis: dims[i].dim_param for i, axis in DYNAMIC_AXES.items()}
    fixed = [axis for axis, p in params.items() if not p]
    tied = not fixed and params["height"] == params["width"]
    if fixed or tied:
        out.unlink(missing_ok=True)
        out.with_name(out.name + ".data").unlink(missing_ok=True)  # external weights, if any
        what = f"fixed the {' and '.join(fixed)}" if fixed else "tied the height to the width"
        other = "legacy" if exporter == "dynamo" else "dynamo"
        raise SETRConfigError(f"dynamic: the {exporter} exporter {what} of the input for encoder {encoder!r}; "
                              f"use exporter={other} or dynamic=false")
    rename = {p: axis for axis, p in params.items()}
    for value in [*proto.graph.input, *proto.graph.output, *proto.graph.value_info]:
        for d in value.type.tensor_type.shape.dim:
            if d.dim_param in rename:
                d.dim_param = rename[d.dim_param]


def _export_torchscript(model, example, out: Path, props: Mapping[str, str]) -> None:
    import warnings

    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", category=FutureWarning, message=".*torch.jit.*deprecated.*")
        traced = torch.jit.trace(model, example, check_trace=False)
        torch.jit.save(traced, str(out), _extra_files={"setr_meta.json": json.dumps(props)})


def _onnx_runner(path: Path):
    import numpy as np
    import torch

    try:
        import onnxruntime as ort
    except ImportError:
        raise SETRConfigError("check: needs onnxruntime (pip install onnxruntime), or pass check=false") from None
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return lambda x: torch.from_numpy(np.asarray(sess.run(None, {INPUT_NAME: x.numpy()})[0]))


def _torchscript_runner(path: Path):
    import warnings

    import torch

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning, message=".*torch.jit.*deprecated.*")
        loaded = torch.jit.load(str(path), map_location="cpu").eval()

    def run(x):
        with torch.no_grad():
            return loaded(x)

    return run


# ------------------------------------------------------------------------------------------- the task
def options(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The keyword arguments of :func:`export` from the composed config (``conf/export.yaml``), checked."""
    from omegaconf import OmegaConf

    if "ckpt_path" not in cfg or OmegaConf.is_missing(cfg, "ckpt_path") or cfg.ckpt_path in (None, ""):
        raise SETRConfigError("ckpt_path: required; pass ckpt_path=<a checkpoint written by setr-train>")
    opts = {key: cfg.get(key) for key in OPTIONS if key in cfg}
    check_options(**opts)
    convert = OmegaConf.to_container(cfg.convert, resolve=True) if isinstance(cfg.get("convert"), Mapping) else None
    return {"ckpt_path": str(cfg.ckpt_path), **opts, "convert": convert}


@task_wrapper
def run(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The job of ``src/export.py``: check the options, export, print the final JSON line. Exit code 1 when the
    exported file differs from PyTorch: it was written, but it must not be deployed unnoticed."""
    import sys

    from omegaconf import DictConfig, OmegaConf

    from setr.utils.config import extras
    from setr.utils.schema import check_added_keys

    if not isinstance(cfg, DictConfig):
        cfg = OmegaConf.create(dict(cfg))
    check_added_keys(cfg)  # a `+key` nothing reads: refused, not ignored
    opts = options(cfg)
    extras(cfg)  # after the checks of the options: an error is the first thing printed
    summary = export(**opts)
    print_last_line(summary)
    if summary.get("check_passed") is False:
        print("error: check: the exported model differs from PyTorch (see max_abs_diff)", file=sys.stderr)
        raise SystemExit(1)
    return summary
