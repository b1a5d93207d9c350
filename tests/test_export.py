"""``python -m setr.export``: ONNX and TorchScript files that equal the PyTorch model, at the export size and
at other (non-square, non-multiple-of-16) sizes and batch sizes; one-line CLI errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import write_tiny_checkpoint

from setr.export import main
from setr.training.module import load_checkpoint_model

ROOT = Path(__file__).resolve().parents[1]
# (batch, height, width): the export size (64x64, the tiny checkpoints' crop) first, then other sizes
SIZES = [(2, 64, 64), (1, 96, 80), (1, 80, 112), (3, 50, 70)]
ATOL = 1e-4

pytestmark = pytest.mark.filterwarnings("ignore:.*torch.jit.*deprecated:FutureWarning")


def _inputs() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(123)
    return [torch.randn(b, 3, h, w, generator=g) for b, h, w in SIZES]


def _run_main(args: list[str], capsys) -> tuple[dict, str]:
    summary = main(args)
    out = capsys.readouterr().out
    last = json.loads(out.strip().splitlines()[-1])
    assert last == json.loads(json.dumps(summary)), "the last stdout line is the returned summary"
    return last, out


def _assert_matches(run, model, what: str) -> None:
    for x in _inputs():
        with torch.no_grad():
            ref = model(x)
        got = run(x)
        assert tuple(got.shape) == (x.shape[0], 4, *x.shape[-2:]), f"{what}: output shape at {tuple(x.shape)}"
        diff = float((got - ref).abs().max())
        assert diff < ATOL, f"{what}: max abs diff {diff} at {tuple(x.shape)}"


@pytest.mark.parametrize("head", ["naive", "mla"])
def test_traced_branches_change_nothing(tmp_path, head, monkeypatch):
    """While traced, the model always resamples its position embeddings and always pads (so the graph works at
    every size): that path gives the same logits as the eager one, at the built grid and at other sizes."""
    import setr.models.encoder

    model, _ = load_checkpoint_model(write_tiny_checkpoint(tmp_path / "m.ckpt", head=head))
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
    ckpt = write_tiny_checkpoint(tmp_path / f"{head}.ckpt", head=head)
    last, out = _run_main([f"ckpt_path={ckpt}", f"exporter={exporter}"], capsys)
    assert last["format"] == "onnx" and last["exporter"] == exporter and last["dynamic"] is True
    assert last["output"] == str(tmp_path / f"{head}.onnx") and Path(last["output"]).is_file()
    assert not Path(last["output"] + ".data").exists(), "one self-contained file"
    assert last["check_passed"] is True and 0 <= last["max_abs_diff"] < ATOL
    assert last["check_sizes"] == [[2, 64, 64], [1, 96, 80], [1, 85, 109]]
    assert "mean=[123.675, 116.28, 103.53]" in out and "classes: background, disc, rectangle, triangle" in out

    proto = onnx.load(last["output"])
    props = {p.key: p.value for p in proto.metadata_props}
    assert json.loads(props["mean"]) == [123.675, 116.28, 103.53]
    assert json.loads(props["std"]) == [58.395, 57.12, 57.375]
    assert json.loads(props["class_names"]) == ["background", "disc", "rectangle", "triangle"]
    assert props["num_classes"] == "4" and len(json.loads(props["palette"])) == 4
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param or d.dim_value for d in dims][1] == 3
    assert all(d.dim_param for i, d in enumerate(dims) if i != 1), "batch, height and width are symbolic"

    model, _ = load_checkpoint_model(ckpt)
    sess = ort.InferenceSession(last["output"], providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == ["image"] and [o.name for o in sess.get_outputs()] == ["logits"]
    _assert_matches(lambda x: torch.from_numpy(sess.run(None, {"image": x.numpy()})[0]), model, f"onnx/{head}")


@pytest.mark.parametrize("head", ["naive", "mla"])
def test_torchscript_equals_pytorch_at_any_size(tmp_path, capsys, head):
    ckpt = write_tiny_checkpoint(tmp_path / f"{head}.ckpt", head=head)
    out_path = tmp_path / "out" / "setr.pt"
    last, _ = _run_main([f"ckpt_path={ckpt}", "format=torchscript", f"output={out_path}"], capsys)
    assert last["format"] == "torchscript" and last["dynamic"] is True and last["output"] == str(out_path)
    assert last["check_passed"] is True and last["max_abs_diff"] < ATOL

    extra = {"setr_meta.json": ""}
    loaded = torch.jit.load(str(out_path), _extra_files=extra)
    meta = json.loads(extra["setr_meta.json"])
    assert json.loads(meta["class_names"]) == ["background", "disc", "rectangle", "triangle"]
    assert json.loads(meta["mean"]) == [123.675, 116.28, 103.53]
    model, _ = load_checkpoint_model(ckpt)
    with torch.no_grad():
        _assert_matches(loaded, model, f"torchscript/{head}")


def test_static_export_is_labelled_and_checked_at_its_size(tmp_path, capsys):
    ckpt = write_tiny_checkpoint(tmp_path / "tiny.ckpt")
    last, out = _run_main([f"ckpt_path={ckpt}", "format=torchscript", "dynamic=false", "height=50", "width=70"],
                          capsys)
    assert last["dynamic"] is False and last["example_size"] == [50, 70] and last["check_sizes"] == [[1, 50, 70]]
    assert last["max_abs_diff"] < ATOL and "fixed size 1x3x50x70" in out


def test_foreign_checkpoint_is_one_error_line(tmp_path, capsys):
    bad = tmp_path / "weights.ckpt"
    torch.save({"pos_embed": torch.zeros(1)}, bad)
    with pytest.raises(SystemExit) as exc:
        main([f"ckpt_path={bad}"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ckpt_path:") and "weights.ckpt" in err[0]


@pytest.mark.parametrize("args,expected", [
    (["ckpt_path={missing}"], "error: ckpt_path: checkpoint"),
    (["ckpt_path={ckpt}", "format=tflite"], "error: format: unknown format 'tflite'"),
    (["ckpt_path={ckpt}", "colour=red"], "error: colour: unknown key"),
    (["ckpt_path={ckpt}", "height=zero"], "error: height: expected a positive integer"),
    (["ckpt_path={ckpt}", "opset=13"], "error: opset: the dynamo exporter writes opsets 18..23"),
    (["format=onnx"], "error: ckpt_path: required"),
])
def test_cli_errors_are_one_line_exit_2(tmp_path, args, expected):
    ckpt = tmp_path / "exists.ckpt"
    ckpt.write_bytes(b"")  # never read: the argument errors come first
    args = [a.format(missing=tmp_path / "missing.ckpt", ckpt=ckpt) for a in args]
    proc = subprocess.run([sys.executable, "-m", "setr.export", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, stdin=subprocess.DEVNULL)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(expected), proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""
