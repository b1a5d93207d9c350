"""src/predict.py: label PNGs + overlays from a checkpoint, on real photos (scikit-image) of any size and mode, at
the checkpoint's test-time resize."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from conftest import write_tiny_checkpoint
from pipeline import CONF, last_json, run_entry
from setr import ModelRecord, load_model
from setr.errors import SETRConfigError
from setr.inference import infer, inference_config, predict_image, predict_images
from setr.models import SETR
from setr.tasks.predict import collect_inputs, output_stems, predict, predict_files, run
from setr.values import resolve_device

# ADE20K's kind of test resize (keep ratio, long side <= 96, short side <= 64), on the tiny models
RESCALE = [{"_target_": "setr.data.transforms.RandomRescale", "img_scale": [96, 64], "ratio_range": None}]


def _photos():
    from skimage import data

    return data.astronaut(), data.camera(), data.coffee()


def write_photos(folder: Path) -> dict[str, tuple[int, int]]:
    """RGB, grayscale, RGBA (odd 150x97) and 16-bit grayscale PNGs, a corrupt PNG and a text file into
    ``folder``; returns {good file name: (width, height)}."""
    astronaut, camera, coffee = _photos()
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(astronaut).resize((160, 160)).save(folder / "astronaut.png")
    Image.fromarray(camera).resize((128, 112)).save(folder / "camera_gray.png")
    Image.fromarray(coffee).resize((150, 97)).convert("RGBA").save(folder / "coffee_rgba.png")
    deep = np.asarray(Image.fromarray(camera).resize((96, 80)), dtype=np.uint16) * 257
    im16 = Image.fromarray(deep)
    assert im16.mode == "I;16"
    im16.save(folder / "camera_16bit.png")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(200)))
    (folder / "notes.txt").write_text("not an image\n")
    return {"astronaut.png": (160, 160), "camera_gray.png": (128, 112), "coffee_rgba.png": (150, 97),
            "camera_16bit.png": (96, 80)}


def _record(ckpt: Path) -> ModelRecord:
    return load_model(ckpt).record


def _labels(folder: Path) -> dict[str, np.ndarray]:
    return {p.name: np.asarray(Image.open(p)) for p in sorted(folder.glob("*_label.png"))}


# ------------------------------------------------------------------------------------------ end to end
def test_folder_of_mixed_images_with_a_corrupt_file(tmp_path, tiny_ckpt):
    sizes = write_photos(tmp_path / "photos")
    proc = run_entry("predict.py", f"ckpt_path={tiny_ckpt}", f"input={tmp_path / 'photos'}", "batch_size=2",
                     log_dir=tmp_path / "logs", check=False)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert "broken.png" in proc.stderr
    result = last_json(proc)
    assert result["processed"] == 4 and result["failed"] == 1
    assert len(result["failures"]) == 1 and "broken.png" in result["failures"][0]
    out = Path(result["output_dir"])
    assert out.is_relative_to(tmp_path / "logs" / "predict" / "runs")  # default: <run dir>/predictions
    record = _record(tiny_ckpt)
    flat = [v for colour in record.palette for v in colour]
    for name, size in sizes.items():
        stem = Path(name).stem
        label = Image.open(out / f"{stem}_label.png")
        assert label.mode == "P" and label.size == size
        assert label.getpalette()[: len(flat)] == flat
        values = np.asarray(label)
        assert values.min() >= 0 and values.max() < record.num_classes
        over = Image.open(out / f"{stem}_overlay.png")
        assert over.mode == "RGB" and over.size == size
        assert not (out / f"{stem}_side.png").exists()
    assert not list(out.glob("broken*")) and not list(out.glob("notes*"))


def test_glob_and_single_file_with_side_by_side(tmp_path, tiny_ckpt, capsys):
    astronaut, _, coffee = _photos()
    src = tmp_path / "in"
    src.mkdir()
    Image.fromarray(astronaut).resize((144, 128)).save(src / "a.jpg")
    Image.fromarray(coffee).resize((150, 97)).save(src / "b.jpg")
    Image.fromarray(coffee).resize((64, 64)).save(src / "c.png")  # not matched by the pattern
    out = tmp_path / "out"
    proc = run_entry("predict.py", f"ckpt_path={tiny_ckpt}", f"input={src}/*.jpg", f"output_dir={out}",
                     "side_by_side=true", "alpha=0.3", log_dir=tmp_path / "logs", check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = last_json(proc)
    assert result == {"processed": 2, "failed": 0, "failures": [], "output_dir": str(out.resolve()), "device": "cpu",
                      "resize": True, "model_sizes": {"144x128": "144x128", "150x97": "150x97"}}  # no test resize
    for stem, (w, h) in (("a", (144, 128)), ("b", (150, 97))):
        assert Image.open(out / f"{stem}_side.png").size == (2 * w, h)
        assert Image.open(out / f"{stem}_label.png").size == (w, h)
    assert not list(out.glob("c_*"))

    # one file, in process: the same function the entry point calls
    single = tmp_path / "single"
    res = run({"ckpt_path": str(tiny_ckpt), "input": str(src / "b.jpg"), "output_dir": str(single),
               "side_by_side": True, "device": "cpu", "batch_size": 4, "alpha": 0.5, "inference": None})
    assert last_json_line(capsys) == res
    assert res["processed"] == 1 and res["failed"] == 0
    assert sorted(p.name for p in single.iterdir()) == ["b_label.png", "b_overlay.png", "b_side.png"]
    assert Image.open(single / "b_side.png").size == (300, 97)


def test_errors_are_one_line_and_exit_2(tmp_path, tiny_ckpt):
    pattern = f"{tmp_path}/nothing/*.png"
    proc = run_entry("predict.py", f"ckpt_path={tiny_ckpt}", f"input={pattern}", log_dir=tmp_path / "logs", check=False)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert len(lines) == 1 and lines[0].startswith("error:") and pattern in lines[0], proc.stderr

    write_photos(tmp_path / "photos")
    missing = tmp_path / "no_such.ckpt"
    proc = run_entry("predict.py", f"ckpt_path={missing}", f"input={tmp_path / 'photos'}", log_dir=tmp_path / "logs",
                     check=False)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert len(lines) == 1 and lines[0].startswith("error: ckpt_path") and str(missing) in lines[0], proc.stderr


# ------------------------------------------------------------------------------------------ in process
def test_batched_equals_unbatched_and_batches_same_size_images(tmp_path, tiny_ckpt):
    astronaut, camera, _ = _photos()
    src = tmp_path / "in"
    src.mkdir()
    base = Image.fromarray(astronaut).resize((112, 96))
    base.save(src / "p0.png")
    base.transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(src / "p1.png")
    Image.fromarray(astronaut[100:292, 150:374]).resize((112, 96)).save(src / "p2.png")
    Image.fromarray(camera).resize((150, 97)).save(src / "q.png")  # another size
    paths = collect_inputs(src)
    model = load_model(tiny_ckpt)
    calls = []
    model.register_forward_hook(lambda m, inp, out: calls.append(inp[0].shape[0]))

    single = predict_files(model, paths, tmp_path / "one", batch_size=1, progress=False)
    assert calls == [1, 1, 1, 1]
    calls.clear()
    batched = predict_files(model, paths, tmp_path / "many", batch_size=3, progress=False)
    assert sorted(calls) == [1, 3]  # the three 112x96 images in one forward, the other alone
    assert single["processed"] == batched["processed"] == 4
    a, b = _labels(tmp_path / "one"), _labels(tmp_path / "many")
    assert a.keys() == b.keys() and len(a) == 4
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


@pytest.mark.parametrize("override,rescale", [(None, False), ({"mode": "slide", "crop_size": 64, "stride": 48}, False),
                                             (None, True)])
def test_labels_equal_argmax_of_infer_computed_independently(tmp_path, override, rescale):
    """The label PNG is the argmax of infer() on the normalised photo, resized first (cv2 bilinear, keep ratio) when
    the checkpoint has a test resize, with the logits brought back to the photo's size."""
    ckpt = write_tiny_checkpoint(tmp_path / "m.ckpt", test_pipeline=RESCALE if rescale else None)
    astronaut = _photos()[0]
    path = tmp_path / "astronaut.png"
    Image.fromarray(astronaut).resize((150, 97)).save(path)
    model = load_model(ckpt)
    predict_files(model, [path], tmp_path / "out", inference=override, progress=False)
    got = np.asarray(Image.open(tmp_path / "out" / "astronaut_label.png"))

    record = model.record
    rgb = np.asarray(Image.open(path).convert("RGB"))
    if rescale:  # 150x97 into 96x64 keeping the ratio: factor min(96/150, 64/97) = 0.64 -> 96x62
        rgb = cv2.resize(rgb, (96, 62), interpolation=cv2.INTER_LINEAR)
    x = (rgb.astype(np.float32) - np.asarray(record.mean, np.float32)) / np.asarray(record.std, np.float32)
    x = torch.from_numpy(x.transpose(2, 0, 1).copy())[None]
    cfg = {**record.inference, **(override or {})}
    logits = infer(model, x, cfg, out_size=(97, 150))
    assert logits.shape == (1, 4, 97, 150)
    np.testing.assert_array_equal(got, logits.argmax(1)[0].numpy())
    np.testing.assert_array_equal(predict_image(model, np.asarray(Image.open(path).convert("RGB")), override), got)


# ------------------------------------------------------------------------------- test-time resize (defect f)
def _compose_predict(*overrides: str):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("predict", overrides=list(overrides))


@pytest.mark.parametrize("resize", [None, False])
def test_photos_run_at_the_checkpoints_test_resize_by_default(tmp_path, capsys, monkeypatch, resize):
    """conf/predict.yaml as composed (resize: true unless overridden) with a checkpoint whose test pipeline rescales
    into 96x64: the network sees the rescaled photos, not their native size (``resize=false``: it does); the
    label PNGs and overlays have the photo's size either way, and the final line says the size the model ran at."""
    ckpt = write_tiny_checkpoint(tmp_path / "rescale.ckpt", test_pipeline=RESCALE)
    astronaut, _, coffee = _photos()
    src = tmp_path / "in"
    src.mkdir()
    Image.fromarray(astronaut).resize((160, 160)).save(src / "astronaut.png")
    Image.fromarray(coffee).resize((150, 97)).save(src / "coffee.png")
    seen: list[tuple[int, int]] = []
    forward = SETR.forward

    def spy(self, x, *args, **kwargs):  # what the network itself is given
        seen.append(tuple(x.shape[-2:]))
        return forward(self, x, *args, **kwargs)

    monkeypatch.setattr(SETR, "forward", spy)
    out = tmp_path / "out"
    extra = [] if resize is None else [f"resize={str(resize).lower()}"]
    cfg = _compose_predict(f"ckpt_path={ckpt}", f"input={src}", f"output_dir={out}", "device=cpu", *extra)
    result = run(cfg)
    assert last_json_line(capsys) == result
    if resize is None:  # 160x160 -> factor min(96, 64) / 160 = 0.4 -> 64x64; 150x97 -> 0.64 -> 96x62
        assert seen == [(64, 64), (62, 96)]
        assert result["resize"] is True and result["model_sizes"] == {"160x160": "64x64", "150x97": "96x62"}
    else:
        assert seen == [(160, 160), (97, 150)]
        assert result["resize"] is False and result["model_sizes"] == {"160x160": "160x160", "150x97": "150x97"}
    for stem, size in (("astronaut", (160, 160)), ("coffee", (150, 97))):
        assert Image.open(out / f"{stem}_label.png").size == size
        assert Image.open(out / f"{stem}_overlay.png").size == size


def test_predict_images_returns_the_network_input(tmp_path):
    """The notebook's entry: labels at the photo's size, the resized normalised input the attention maps read."""
    model = load_model(write_tiny_checkpoint(tmp_path / "m.ckpt", test_pipeline=RESCALE))
    photo = np.asarray(Image.fromarray(_photos()[1]).convert("RGB").resize((128, 112)))
    pred = predict_images(model, [photo, photo[:, ::-1].copy()])
    assert pred.labels.shape == (2, 112, 128) and pred.labels.dtype == np.uint8
    assert pred.input_size == (64, 73) and pred.input.shape == (2, 3, 64, 73)  # min(96/128, 64/112) = 0.571
    assert predict_images(model, [photo], resize=False).input_size == (112, 128)
    with pytest.raises(ValueError, match="one size"):
        predict_images(model, [photo, photo[:64]])


def last_json_line(capsys) -> dict:
    import json

    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_collect_inputs_stems_inference_and_device(tmp_path):
    (tmp_path / "sub").mkdir()
    for name in ("b.PNG", "a.jpg", "a.png", "readme.md", "sub/c.png"):
        (tmp_path / name).write_bytes(b"x")
    assert [p.name for p in collect_inputs(tmp_path)] == ["a.jpg", "a.png", "b.PNG"]  # sorted, not recursive
    assert [p.name for p in collect_inputs(f"{tmp_path}/**/*.png")] == ["a.png", "c.png"]
    assert collect_inputs(tmp_path / "readme.md") == [tmp_path / "readme.md"]  # a named file is always taken
    with pytest.raises(SETRConfigError, match=r"input: no image files match .*\*\.tif"):
        collect_inputs(f"{tmp_path}/*.tif")
    with pytest.raises(SETRConfigError, match="not found"):
        collect_inputs(tmp_path / "missing.png")
    assert output_stems([Path("x/a.jpg"), Path("x/a.png"), Path("y/a.png"), Path("b.png")]) == \
        ["a_jpg", "a_png", "a_png-2", "b"]

    record = ModelRecord(model={"num_classes": 4}, class_names=[], palette=[], crop_size=96,
                         inference={"mode": "whole", "flip": True})
    assert inference_config(record) == {"mode": "whole", "flip": True}
    assert inference_config(record, {"mode": "slide", "flip": None}) == \
        {"mode": "slide", "flip": True, "crop_size": [96, 96], "stride": [64, 64]}
    with pytest.raises(SETRConfigError, match=r"inference\.size"):
        inference_config(record, {"size": 3})
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(SETRConfigError, match="device"):
        resolve_device("tpu")
    with pytest.raises(SETRConfigError, match="resize: must be true or false, got 'maybe'"):
        predict({"ckpt_path": "x.ckpt", "input": "y.png", "resize": "maybe"})
