"""src/predict.py: label PNGs + overlays from a checkpoint, on real photos (scikit-image) of any size and mode."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pipeline import last_json, run_entry

from setr.errors import SETRConfigError
from setr.inference import infer
from setr.predict import (
    collect_inputs,
    colorize,
    inference_config,
    output_stems,
    overlay,
    predict_files,
    resolve_device,
    run,
    side_by_side_image,
)


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


def _meta(ckpt: Path) -> dict:
    return torch.load(ckpt, map_location="cpu", weights_only=False)["hyper_parameters"]


def _load(ckpt: Path):
    from setr.training.module import load_checkpoint_model

    return load_checkpoint_model(ckpt, map_location="cpu")


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
    hp = _meta(tiny_ckpt)
    flat = [v for colour in hp["palette"] for v in colour]
    for name, size in sizes.items():
        stem = Path(name).stem
        label = Image.open(out / f"{stem}_label.png")
        assert label.mode == "P" and label.size == size
        assert label.getpalette()[: len(flat)] == flat
        values = np.asarray(label)
        assert values.min() >= 0 and values.max() < hp["num_classes"]
        over = Image.open(out / f"{stem}_overlay.png")
        assert over.mode == "RGB" and over.size == size
        assert not (out / f"{stem}_side.png").exists()
    assert not list(out.glob("broken*")) and not list(out.glob("notes*"))


def test_glob_and_single_file_with_side_by_side(tmp_path, tiny_ckpt):
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
    assert result == {"processed": 2, "failed": 0, "failures": [], "output_dir": str(out.resolve()), "device": "cpu"}
    for stem, (w, h) in (("a", (144, 128)), ("b", (150, 97))):
        assert Image.open(out / f"{stem}_side.png").size == (2 * w, h)
        assert Image.open(out / f"{stem}_label.png").size == (w, h)
    assert not list(out.glob("c_*"))

    # one file, in process: the same function the entry point calls
    single = tmp_path / "single"
    res = run({"ckpt_path": str(tiny_ckpt), "input": str(src / "b.jpg"), "output_dir": str(single),
               "side_by_side": True, "device": "cpu", "batch_size": 4, "alpha": 0.5, "inference": None})
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
    model, meta = _load(tiny_ckpt)
    calls = []
    model.register_forward_hook(lambda m, inp, out: calls.append(inp[0].shape[0]))

    single = predict_files(model, meta, paths, tmp_path / "one", batch_size=1, progress=False)
    assert calls == [1, 1, 1, 1]
    calls.clear()
    batched = predict_files(model, meta, paths, tmp_path / "many", batch_size=3, progress=False)
    assert sorted(calls) == [1, 3]  # the three 112x96 images in one forward, the other alone
    assert single["processed"] == batched["processed"] == 4
    a, b = _labels(tmp_path / "one"), _labels(tmp_path / "many")
    assert a.keys() == b.keys() and len(a) == 4
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


@pytest.mark.parametrize("override", [None, {"mode": "slide", "crop_size": 64, "stride": 48}])
def test_labels_equal_argmax_of_infer_computed_independently(tmp_path, tiny_ckpt, override):
    astronaut = _photos()[0]
    path = tmp_path / "astronaut.png"
    Image.fromarray(astronaut).resize((150, 97)).save(path)
    model, meta = _load(tiny_ckpt)
    predict_files(model, meta, [path], tmp_path / "out", inference=override, progress=False)
    got = np.asarray(Image.open(tmp_path / "out" / "astronaut_label.png"))

    hp = _meta(tiny_ckpt)
    rgb = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32)
    x = (rgb - np.asarray(hp["mean"], np.float32)) / np.asarray(hp["std"], np.float32)
    x = torch.from_numpy(x.transpose(2, 0, 1).copy())[None]
    cfg = {**hp["inference"], **(override or {})}
    logits = infer(model, x, cfg, out_size=(97, 150))
    assert logits.shape == (1, 4, 97, 150)
    np.testing.assert_array_equal(got, logits.argmax(1)[0].numpy())


def test_colorize_overlay_and_side_by_side():
    palette = [[255, 0, 0], [0, 255, 0], [0, 0, 255]]
    label = np.array([[0, 1], [2, 255]], np.int64)
    im = colorize(label, palette)
    assert im.mode == "P" and np.array_equal(np.asarray(im), label.astype(np.uint8))
    assert np.asarray(im.convert("RGB"))[1, 0].tolist() == [0, 0, 255]
    image = np.full((2, 2, 3), 100, np.uint8)
    blend = np.asarray(overlay(image, label, palette, alpha=0.25))
    assert blend[0, 0].tolist() == [139, 75, 75]  # 0.75 * 100 + 0.25 * 255 = 138.75
    assert blend[1, 1].tolist() == [100, 100, 100]  # id without a palette entry keeps the image
    assert np.array_equal(np.asarray(overlay(image, label, palette, alpha=0.0)), image)
    assert side_by_side_image(image[..., 0], label, palette).size == (4, 2)
    with pytest.raises(SETRConfigError, match="alpha"):
        overlay(image, label, palette, alpha=1.5)


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

    meta = {"inference": {"mode": "whole", "flip": True}, "crop_size": 96}
    assert inference_config(meta) == {"mode": "whole", "flip": True}
    assert inference_config(meta, {"mode": "slide", "flip": None}) == \
        {"mode": "slide", "flip": True, "crop_size": 96, "stride": [64, 64]}
    with pytest.raises(SETRConfigError, match="inference.size"):
        inference_config(meta, {"size": 3})
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(SETRConfigError, match="device"):
        resolve_device("tpu")
