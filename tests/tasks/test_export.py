"""``src/export.py`` (alias ``python -m setr.export``): ONNX and TorchScript files that equal the PyTorch model,
at the export size and at other (non-square, non-multiple-of-16) sizes and batch sizes; metadata from the
checkpoint's record; one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from conftest import write_tiny_checkpoint
from pipeline import ROOT, last_json, run_entry
from setr import load_model
from setr.errors import SETRConfigError
from setr.tasks.export import export, options, run

# (batch, height, width): the export size (64x64, the tiny checkpoints' crop) first, then other sizes
SIZES = [(2, 64, 64), (1, 96, 80), (1, 80, 112), (3, 50, 70)]
ATOL = 1e-4
RESCALE = [{"_target_": "setr.data.transforms.RandomRescale", "img_scale": [96, 64], "ratio_range": None}]

pytestmark = pytest.mark.filterwarnings("ignore:.*torch.jit.*deprecated:FutureWarning")


def _inputs() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(123)
    return [torch.randn(b, 3, h, w, generator=g) for b, h, w in SIZES]


def _run(cfg: dict, capsys) -> tuple[dict, str]:
    """The task as the entry points run it (their composed config is this mapping plus conf/export.yaml's
    defaults, which are also run()'s)."""
    summary = run(cfg)
    out = capsys.readouterr().out
    last = json.loads(out.strip().splitlines()[-1])
    assert last == json.loads(json.dumps(summary)), "the last stdout line is the returned summary"
    return last, out


def _assert_matches(run_file, model, what: str) -> None:
    for x in _inputs():
        with torch.no_grad():
            ref = model(x)
        got = run_file(x)
        assert tuple(got.shape) == (x.shape[0], 4, *x.shape[-2:]), f"{what}: output shape at {tuple(x.shape)}"
        diff = float((got - ref).abs().max())
        assert diff < ATOL, f"{what}: max abs diff {diff} at {tuple(x.shape)}"


@pytest.mark.parametrize("head", ["naive", "mla"])
def test_traced_branches_change_nothing(tmp_path, head, monkeypatch):
    """While traced, the model always resamples its position embeddings and always pads (so the graph works at
    every size): that path gives the same logits as the eager one, at the built grid and at other sizes."""
    import setr.models.encoder

    model = load_model(write_tiny_checkpoint(tmp_path / "m.ckpt", head=head))
    xs = _inputs()
    with torch.no_grad():
        ref = [model(x) for x in xs]
        monkeypatch.setattr(setr.models.encoder, "is_tracing", lambda: True)  # both the padding and the resampling
        got = [model(x) for x in xs]
    for r, g in zip(ref, got):
        torch.testing.assert_close(g, r, atol=1e-6, rtol=0)


# MLA: neck over 4 levels, cls token dropped before the blocks. The default torch.export-based exporter takes
# ~10 s a head on 2 CPU cores (hence slow for the second head), the legacy TorchScript-based one ~1 s
@pytest.mark.parametrize("head,exporter", [("naive", "dynamo"), ("mla", "legacy"),
                                           pytest.param("mla", "dynamo", marks=pytest.mark.slow)])
def test_onnx_equals_pytorch_at_any_size(tmp_path, capsys, head, exporter):
    import onnx

    ort = pytest.importorskip("onnxruntime")
    ckpt = write_tiny_checkpoint(tmp_path / f"{head}.ckpt", head=head, test_pipeline=RESCALE,
                                 inference={"mode": "slide", "crop_size": 64, "stride": 48})
    last, out = _run({"ckpt_path": str(ckpt), "exporter": exporter}, capsys)
    assert last["format"] == "onnx" and last["exporter"] == exporter and last["dynamic"] is True
    assert last["output"] == str(tmp_path / f"{head}.onnx") and Path(last["output"]).is_file()  # next to the ckpt
    assert not Path(last["output"] + ".data").exists(), "one self-contained file"
    assert last["check_passed"] is True and 0 <= last["max_abs_diff"] < ATOL
    assert last["check_sizes"] == [[2, 64, 64], [1, 96, 80], [1, 85, 109]]
    assert "mean=[123.675, 116.28, 103.53]" in out and "classes: background, disc, rectangle, triangle" in out

    proto = onnx.load(last["output"])
    props = {p.key: p.value for p in proto.metadata_props}
    record = load_model(ckpt).record
    assert json.loads(props["mean"]) == [123.675, 116.28, 103.53]
    assert json.loads(props["std"]) == [58.395, 57.12, 57.375]
    assert json.loads(props["class_names"]) == ["background", "disc", "rectangle", "triangle"]
    assert props["num_classes"] == "4" and json.loads(props["palette"]) == record.palette[:4]
    assert json.loads(props["crop_size"]) == [64, 64] and props["ignore_index"] == "255"
    assert json.loads(props["inference"]) == {"mode": "slide", "crop_size": 64, "stride": 48}
    assert json.loads(props["test_pipeline"]) == RESCALE, "the deployer's test-time resize"
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param or d.dim_value for d in dims][1] == 3
    assert all(d.dim_param for i, d in enumerate(dims) if i != 1), "batch, height and width are symbolic"

    model = load_model(ckpt)
    sess = ort.InferenceSession(last["output"], providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == ["image"] and [o.name for o in sess.get_outputs()] == ["logits"]
    _assert_matches(lambda x: torch.from_numpy(sess.run(None, {"image": x.numpy()})[0]), model, f"onnx/{head}")


@pytest.mark.parametrize("head", ["naive", "mla"])
def test_torchscript_equals_pytorch_at_any_size(tmp_path, capsys, head):
    ckpt = write_tiny_checkpoint(tmp_path / f"{head}.ckpt", head=head)
    out_path = tmp_path / "out" / "setr.pt"
    last, _ = _run({"ckpt_path": str(ckpt), "format": "torchscript", "output": str(out_path)}, capsys)
    assert last["format"] == "torchscript" and last["dynamic"] is True and last["output"] == str(out_path)
    assert last["check_passed"] is True and last["max_abs_diff"] < ATOL

    extra = {"setr_meta.json": ""}
    loaded = torch.jit.load(str(out_path), _extra_files=extra)
    meta = json.loads(extra["setr_meta.json"])
    assert json.loads(meta["class_names"]) == ["background", "disc", "rectangle", "triangle"]
    assert json.loads(meta["mean"]) == [123.675, 116.28, 103.53]
    assert json.loads(meta["test_pipeline"]) == []
    model = load_model(ckpt)
    with torch.no_grad():
        _assert_matches(loaded, model, f"torchscript/{head}")


def test_static_export_is_labelled_and_checked_at_its_size(tmp_path, capsys):
    ckpt = write_tiny_checkpoint(tmp_path / "tiny.ckpt")
    last, out = _run({"ckpt_path": str(ckpt), "format": "torchscript", "dynamic": False, "height": 50, "width": 70},
                     capsys)
    assert last["dynamic"] is False and last["example_size"] == [50, 70] and last["check_sizes"] == [[1, 50, 70]]
    assert last["max_abs_diff"] < ATOL and "fixed size 1x3x50x70" in out


def test_foreign_checkpoint_is_one_error(tmp_path):
    bad = tmp_path / "weights.ckpt"
    torch.save({"pos_embed": torch.zeros(1)}, bad)
    with pytest.raises(SETRConfigError, match=r"^ckpt_path: .*weights\.ckpt") as exc:
        export(bad)
    assert "\n" not in str(exc.value)


@pytest.mark.parametrize("opts,expected", [
    ({"ckpt_path": "{missing}"}, "ckpt_path: checkpoint"),
    ({"format": "tflite"}, "format: unknown format 'tflite'"),
    ({"height": "zero"}, "height: expected a positive integer or null, got 'zero'"),
    ({"width": 0}, "width: expected a positive integer or null, got 0"),
    ({"dynamic": "maybe"}, "dynamic: expected true or false, got 'maybe'"),
    ({"opset": 13}, "opset: the dynamo exporter writes opsets 18..23, got 13; use exporter=legacy"),
    ({"exporter": "legacy", "opset": 21}, "opset: the legacy exporter writes opsets 7..20"),
    ({"format": "torchscript", "exporter": "legacy"}, "exporter: applies to format=onnx only"),
    ({"ckpt_path": None}, "ckpt_path: required"),
])
def test_bad_values_are_one_line_before_the_checkpoint_is_read(tmp_path, opts, expected):
    ckpt = tmp_path / "exists.ckpt"
    ckpt.write_bytes(b"")  # never read: the value errors come first
    cfg = {"ckpt_path": str(ckpt), **opts}
    if cfg["ckpt_path"] == "{missing}":
        cfg["ckpt_path"] = str(tmp_path / "missing.ckpt")
    with pytest.raises(SETRConfigError) as exc:
        export(**options(OmegaConf.create(cfg)))
    assert str(exc.value).startswith(expected) and "\n" not in str(exc.value), str(exc.value)


# ---------------------------------------------------------------------------------------- entry points
def _one_error_line(proc: subprocess.CompletedProcess, expected: str) -> None:
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and proc.stdout.strip() == ""
    assert len(lines) == 1 and lines[0].startswith(expected), proc.stderr


def test_src_export_end_to_end_and_a_bad_value(tmp_path):
    """``python src/export.py`` from the repository root, as a user runs it (the default dynamo exporter): the file
    lands next to the checkpoint, nothing is written into the repository (no run folder), stdout holds the
    task's own lines only (the ONNX libraries log each graph rewrite at INFO); a bad value is one line, exit 2."""
    ckpt = write_tiny_checkpoint(tmp_path / "run" / "last.ckpt")
    before = set(os.listdir(ROOT))
    proc = run_entry("export.py", f"ckpt_path={ckpt}", log_dir=tmp_path / "logs")
    last = last_json(proc)
    assert last["output"] == str(tmp_path / "run" / "last.onnx") and Path(last["output"]).is_file()
    assert last["check_passed"] is True and last["max_abs_diff"] < ATOL and last["exporter"] == "dynamo"
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 7 and lines[0].startswith("exported onnx") and lines[5].startswith("check:"), proc.stdout
    assert set(os.listdir(ROOT)) == before and not (tmp_path / "logs").exists(), "no run folder, no stray files"

    bad = run_entry("export.py", f"ckpt_path={ckpt}", "format=tflite", log_dir=tmp_path / "logs", check=False)
    _one_error_line(bad, "error: format: unknown format 'tflite'; choose one of onnx, torchscript")


def test_python_m_setr_export_is_the_same_command(tmp_path):
    ckpt = write_tiny_checkpoint(tmp_path / "tiny.ckpt")
    out = tmp_path / "deploy" / "setr.pt"

    def alias(*args: str) -> subprocess.CompletedProcess:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        return subprocess.run([sys.executable, "-m", "setr.export", *args], cwd=ROOT, capture_output=True,
                              text=True, timeout=1200, stdin=subprocess.DEVNULL, env=env)

    proc = alias(f"ckpt_path={ckpt}", "format=torchscript", f"output={out}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    last = last_json(proc)
    assert last["format"] == "torchscript" and last["output"] == str(out) and last["check_passed"] is True
    _one_error_line(alias(f"ckpt_path={ckpt}", "colour=red"), "error: Could not override 'colour'")
    _one_error_line(alias("format=onnx"), "error: ckpt_path: required")
