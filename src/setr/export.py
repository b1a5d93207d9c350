"""Export a training checkpoint to ONNX or TorchScript for deployment.

    python -m setr.export ckpt_path=logs/train/runs/<run>/checkpoints/last.ckpt            # -> last.onnx
    python -m setr.export ckpt_path=... format=torchscript                                # -> last.pt
    python -m setr.export ckpt_path=... output=setr.onnx height=512 width=1024 dynamic=false check=false

Keys (``key=value``): ``ckpt_path`` (required), ``format`` (``onnx`` | ``torchscript``, default ``onnx``),
``output`` (default: next to the checkpoint, ``<stem>.onnx`` / ``<stem>.pt``), ``height`` / ``width`` of the
example input (default: the checkpoint's crop size), ``dynamic`` (default true: batch, height and width are
free), ``check`` (default true: run the exported file on random inputs and compare with PyTorch), and for ONNX
only ``exporter`` (``dynamo`` = ``torch.export``, the default, or ``legacy`` = the TorchScript-based exporter,
much quicker) and ``opset`` (default 18 for ``dynamo``, which writes 18..23; 17 for ``legacy``, 7..20).

The exported graph is SETR's eval forward: input ``image`` float32 ``(B, 3, H, W)``, RGB normalised as
``(pixel - mean) / std`` on the 0..255 scale; output ``logits`` float32 ``(B, num_classes, H, W)``.
mean, std, class names and palette are stored in the ONNX ``metadata_props`` (and in the TorchScript file as
the extra file ``setr_meta.json``). Only the whole-image forward is exported: slide / multi-scale inference
(``meta["inference"]``) is the deployer's loop around it.

Dynamic sizes. Tracers (``torch.jit.trace``, both ONNX exporters) record one branch of every Python ``if`` on
the input shape. The model takes care of that itself (``setr.models.encoder.is_tracing``): while traced it
always resamples the position embeddings and always pads to a multiple of the patch size (both exact no-ops at
the built size), so the exported graph works at every size. The check compares the file with PyTorch at the
export size and, for a dynamic export, at two other sizes, one of them not a multiple of 16.

The last stdout line is one JSON object (``format``, ``output``, ``dynamic``, ``max_abs_diff``, ...).
Unknown keys, bad values, a missing or foreign checkpoint: one ``error:`` line on stderr, exit code 2.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from setr.errors import SETRConfigError

FORMATS = ("onnx", "torchscript")
EXPORTERS = ("dynamo", "legacy")
SUFFIX = {"onnx": ".onnx", "torchscript": ".pt"}
DEFAULTS: dict[str, Any] = {"ckpt_path": None, "format": "onnx", "output": None, "height": None, "width": None,
                            "opset": None, "exporter": "dynamo", "dynamic": True, "check": True}
DEFAULT_OPSET = {"dynamo": 18, "legacy": 17}
OPSET_RANGE = {"dynamo": (18, 23), "legacy": (7, 20)}  # torch.onnx: dynamo cannot down-convert below 18
TRUE, FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")
INPUT_NAME, OUTPUT_NAME = "image", "logits"

USAGE = """usage: python -m setr.export ckpt_path=PATH [format=onnx|torchscript] [output=PATH] [height=H] [width=W]
                        [opset=N] [exporter=dynamo|legacy] [dynamic=true|false] [check=true|false]"""


# --------------------------------------------------------------------------------------------- arguments
def parse_args(argv: Sequence[str]) -> dict[str, Any]:
    """``key=value`` strings -> a complete options dict; any mistake raises one :class:`SETRConfigError`."""
    opts = dict(DEFAULTS)
    for arg in argv:
        if "=" not in arg:
            raise SETRConfigError(f"{arg}: expected key=value (keys: {', '.join(DEFAULTS)})")
        key, value = arg.split("=", 1)
        key = key.strip()
        if key not in DEFAULTS:
            raise SETRConfigError(f"{key}: unknown key; choose from {', '.join(DEFAULTS)}")
        opts[key] = _parse_value(key, value.strip())
    if not opts["ckpt_path"]:
        raise SETRConfigError("ckpt_path: required (python -m setr.export ckpt_path=path/to/last.ckpt)")
    ckpt = Path(opts["ckpt_path"])
    if not ckpt.is_file():
        raise SETRConfigError(f"ckpt_path: checkpoint {ckpt} not found")
    if opts["format"] != "onnx":
        for key in ("opset", "exporter"):
            if opts[key] != DEFAULTS[key]:
                raise SETRConfigError(f"{key}: applies to format=onnx only")
    check_opset(opts["opset"], opts["exporter"])
    return opts


def check_opset(opset: int | None, exporter: str) -> None:
    low, high = OPSET_RANGE[exporter]
    if opset is not None and not low <= opset <= high:
        hint = "; use exporter=legacy for an older opset" if exporter == "dynamo" and opset < low else ""
        raise SETRConfigError(f"opset: the {exporter} exporter writes opsets {low}..{high}, got {opset}{hint}")


def _parse_value(key: str, value: str) -> Any:
    if key == "format":
        if value not in FORMATS:
            raise SETRConfigError(f"format: unknown format {value!r}; choose one of {', '.join(FORMATS)}")
        return value
    if key == "exporter":
        if value not in EXPORTERS:
            raise SETRConfigError(f"exporter: unknown exporter {value!r}; choose one of {', '.join(EXPORTERS)}")
        return value
    if key in ("dynamic", "check"):
        if value.lower() in TRUE:
            return True
        if value.lower() in FALSE:
            return False
        raise SETRConfigError(f"{key}: expected true or false, got {value!r}")
    if key in ("height", "width", "opset"):
        if value.lower() in ("", "null", "none"):
            return None
        try:
            n = int(value)
        except ValueError:
            raise SETRConfigError(f"{key}: expected a positive integer, got {value!r}") from None
        low = 7 if key == "opset" else 1
        if n < low:
            raise SETRConfigError(f"{key}: expected an integer >= {low}, got {n}")
        return n
    if key == "output" and value.lower() in ("", "null", "none"):
        return None
    if not value:
        raise SETRConfigError(f"{key}: empty value")
    return value


# ------------------------------------------------------------------------------------------- export
def default_output(ckpt_path: str | Path, fmt: str) -> Path:
    ckpt = Path(ckpt_path)
    return ckpt.with_name(ckpt.stem + SUFFIX[fmt])


def example_size(meta: Mapping[str, Any], height: int | None, width: int | None) -> tuple[int, int]:
    crop = meta.get("crop_size") or 512
    ch, cw = (crop, crop) if isinstance(crop, int) else (int(crop[0]), int(crop[-1]))
    return int(height or ch), int(width or cw)


def check_sizes(h: int, w: int, dynamic: bool) -> list[tuple[int, int, int]]:
    """``(batch, height, width)`` the check runs: the export size, and for a dynamic export two more sizes
    (another batch size; one of them not a multiple of 16)."""
    if not dynamic:
        return [(1, h, w)]
    return [(2, h, w), (1, h + 32, w + 16), (1, h + 21, w + 45)]


def preprocessing(meta: Mapping[str, Any]) -> dict[str, str]:
    """The metadata stored with the exported file (string values, as ONNX ``metadata_props`` wants)."""
    return {
        "input": f"{INPUT_NAME}: float32 (B, 3, H, W), RGB, (pixel - mean) / std with pixels on the 0..255 scale",
        "output": f"{OUTPUT_NAME}: float32 (B, num_classes, H, W); argmax over dim 1 is the label map",
        "mean": json.dumps([float(v) for v in meta["mean"]]),
        "std": json.dumps([float(v) for v in meta["std"]]),
        "num_classes": str(int(meta["num_classes"])),
        "class_names": json.dumps(list(meta["class_names"])),
        "palette": json.dumps([list(map(int, c)) for c in meta["palette"]] if meta.get("palette") else None),
        "crop_size": json.dumps(meta.get("crop_size")),
        "inference": json.dumps(meta.get("inference") or {}),
    }


def export(ckpt_path: str | Path, format: str = "onnx", output: str | Path | None = None,  # noqa: A002
           height: int | None = None, width: int | None = None, opset: int | None = None,
           exporter: str = "dynamo", dynamic: bool = True, check: bool = True, log=print) -> dict[str, Any]:
    """Export ``ckpt_path``; returns the summary printed as the CLI's last line."""
    import torch

    from setr.training.module import load_checkpoint_model

    if format not in FORMATS:
        raise SETRConfigError(f"format: unknown format {format!r}; choose one of {', '.join(FORMATS)}")
    if exporter not in EXPORTERS:
        raise SETRConfigError(f"exporter: unknown exporter {exporter!r}; choose one of {', '.join(EXPORTERS)}")
    if format == "onnx":
        check_opset(opset, exporter)
    model, meta = load_checkpoint_model(ckpt_path)
    model = model.float().eval()
    out = Path(output) if output else default_output(ckpt_path, format)
    out.parent.mkdir(parents=True, exist_ok=True)
    h, w = example_size(meta, height, width)
    sizes = check_sizes(h, w, dynamic)
    example = torch.randn(sizes[0][0], 3, h, w, generator=torch.Generator().manual_seed(0))
    props = preprocessing(meta)
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
    names = list(meta["class_names"])
    shown = ", ".join(names[:20]) + (f", ... ({len(names)} in all)" if len(names) > 20 else "")
    log(f"output {OUTPUT_NAME!r}: float32 (B, {meta['num_classes']}, H, W); classes: {shown}")
    log("  (stored in the ONNX metadata_props)" if format == "onnx" else "  (stored as the extra file setr_meta.json)")
    summary: dict[str, Any] = {
        "format": format, "output": str(out), "dynamic": bool(dynamic), "max_abs_diff": None,
        "example_size": [h, w], **({"exporter": exporter, "opset": info["opset"]} if format == "onnx" else {}),
        "num_classes": int(meta["num_classes"]), "mean": json.loads(props["mean"]), "std": json.loads(props["std"]),
        "class_names": list(meta["class_names"]), "seconds": round(seconds, 2),
    }
    if check:
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
        summary.update(max_abs_diff=worst, check_sizes=[list(s) for s in sizes], check_passed=ok)
    return summary


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
                dim = torch.export.Dim
                kwargs["dynamic_shapes"] = ({0: dim("batch"), 2: dim("height"), 3: dim("width")},)
            # one self-contained file unless the weights exceed protobuf's 2 GiB (then <output>.data beside it)
            nbytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
            external = nbytes > 1.8 * 2**30
            torch.onnx.export(model, (example,), str(out), dynamo=True, verbose=False, external_data=external,
                              **kwargs)
        else:
            if dynamic:
                axes = {0: "batch", 2: "height", 3: "width"}
                kwargs["dynamic_axes"] = {INPUT_NAME: axes, OUTPUT_NAME: axes}
            torch.onnx.export(model, (example,), str(out), dynamo=False, **kwargs)
    proto = onnx.load(str(out), load_external_data=False)
    del proto.metadata_props[:]
    for key, value in props.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    proto.doc_string = "SETR semantic segmentation: " + props["input"] + " -> " + props["output"]
    onnx.save(proto, str(out))
    opsets = [o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")]
    return {"opset": opsets[0] if opsets else opset}


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


# ---------------------------------------------------------------------------------------------- CLI
def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help", "help") for a in argv):
        print(__doc__.split("\n\n")[0].strip() + "\n\n" + USAGE)
        raise SystemExit(0)
    try:
        summary = export(**parse_args(argv))
    except SETRConfigError as e:
        print("error: " + " ".join(str(e).split()), file=sys.stderr, flush=True)  # always one line
        raise SystemExit(2) from None
    from setr.utils.run import print_last_line

    print_last_line(summary)
    if summary.get("check_passed") is False:
        print("error: check: the exported model differs from PyTorch (see max_abs_diff)", file=sys.stderr)
        raise SystemExit(1)
    return summary


if __name__ == "__main__":
    main()
