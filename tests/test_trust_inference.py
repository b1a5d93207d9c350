"""No silently wrong number from inference: every pixel in a window, no class made of NaN / inf logits, eval scores
a checkpoint with the settings stored in it, the published number only beside the paper's protocol, a damaged
checkpoint file named as such, a slow whole-image forward announced."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

import fake_datasets as fake
from conftest import _compose, write_tiny_checkpoint
from pipeline import CONF, last_json, run_entry
from setr.errors import SETRConfigError


class _Spy(torch.nn.Module):
    """A pointwise network that records the size of every input (so a test can tell no forward ran)."""

    def __init__(self, value: float | None = None) -> None:
        super().__init__()
        self.sizes: list[tuple[int, int]] = []
        self.value = value

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.sizes.append(tuple(x.shape[-2:]))
        out = torch.cat([x[:, :1], -x[:, :1]], 1)
        if self.value is not None:
            out = out.clone()
            out[:, 1, 0, 0] = self.value
        return out


# ---------------------------------------------------------------------------------------- sliding windows
def test_a_stride_longer_than_the_window_is_refused_before_any_forward():
    """The issue's case: crop 128, stride 320 on 512x512 left 61 % of the pixels in no window (NaN -> class 0)."""
    from setr.inference import infer

    spy = _Spy()
    with pytest.raises(SETRConfigError, match=r"^data\.inference\.stride: \[320, 320\] is longer than the window "
                                              r"data\.inference\.crop_size \[128, 128\].*data\.inference\.stride=85"):
        infer(spy, torch.zeros(1, 3, 512, 512), {"mode": "slide", "crop_size": 128, "stride": 320})
    assert spy.sizes == [], "no forward ran"
    with pytest.raises(SETRConfigError, match=r"data\.inference\.stride: \[20, 40\] is longer"):  # one axis is enough
        infer(spy, torch.zeros(1, 3, 64, 64), {"mode": "slide", "crop_size": [32, 32], "stride": [20, 40]})


@pytest.mark.parametrize(("h", "w", "crop", "stride"), [
    (512, 512, 128, 128), (100, 37, 32, 31), (97, 203, [40, 64], [40, 1]), (30, 30, 64, 64), (129, 64, 64, [1, 64])])
def test_every_window_grid_covers_every_pixel(h, w, crop, stride):
    """Strides up to the window: a pointwise network gives its own logits everywhere (no pixel left at 0/0)."""
    from setr.inference import infer

    spy, x = _Spy(), torch.randn(1, 3, h, w)
    out = infer(spy, x, {"mode": "slide", "crop_size": crop, "stride": stride, "batch_size": 64})
    torch.testing.assert_close(out, spy(x))


def test_the_window_grid_guard_sees_a_gap():
    from setr.inference import _covers

    assert _covers([(0, 0, 32, 32), (0, 24, 32, 56), (8, 0, 40, 32), (8, 24, 40, 56)], 40, 56)
    assert not _covers([(0, 0, 32, 32), (0, 40, 32, 72)], 32, 72), "columns 32..39 in no window"
    assert not _covers([(0, 0, 32, 32)], 40, 32), "rows 32..39 in no window"


@pytest.mark.parametrize(("data", "crop", "stride"), [("ade20k", 512, 341), ("cityscapes", 768, 512),
                                                      ("pascal_context", 480, 320), ("pascal_context_59", 480, 320),
                                                      ("folder", 480, 320)])
def test_data_configs_derive_the_stride_from_the_window(data, crop, stride):
    """The paper's strides exactly at the paper's crops, and 2/3 of any other crop (the README's advice to shrink
    data.crop_size for small images no longer leaves the 320 stride of a 480 crop behind)."""
    from setr.inference import check_inference

    cfg = OmegaConf.to_container(_compose((f"data={data}", "data.num_classes=3"), "train").data, resolve=True)
    assert (cfg["inference"]["crop_size"], cfg["inference"]["stride"]) == (crop, stride)
    small = _compose((f"data={data}", "data.num_classes=3", "data.crop_size=128"), "train").data.inference
    assert (small.crop_size, small.stride) == (128, 85)
    check_inference(OmegaConf.to_container(small, resolve=True))
    window = _compose((f"data={data}", "data.num_classes=3", "data.inference.crop_size=[96,48]"), "train")
    assert list(window.data.inference.stride) == [64, 32], "the stride follows the window, not only data.crop_size"


def test_paper_presets_keep_their_published_windows():
    """Every experiment preset composes to its data config's published stride (341 / 512 / 320)."""
    presets = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))
    published = {"ade20k": (512, 341), "cityscapes": (768, 512), "pascal": (480, 320)}
    assert len(presets) > 30
    for name in presets:
        inf = _compose((f"experiment={name}",), "eval").data.inference
        assert (inf.crop_size, inf.stride) == published[name.split("_")[0]], name


def test_train_refuses_a_stride_longer_than_the_window_before_training(tmp_path):
    root = fake.make_folder(tmp_path / "data", n_train=1, n_val=1)
    proc = run_entry("train.py", *_folder(root), "model/encoder=vit_test", "data.crop_size=32",
                     "data.inference.stride=40", "trainer.max_steps=1", log_dir=tmp_path, check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert lines == [lines[-1]] and "data.inference.stride: [40, 40] is longer than the window" in lines[0]
    assert "Traceback" not in proc.stderr and not list(tmp_path.rglob("*.ckpt"))


# ---------------------------------------------------------------------------------------- non-finite logits
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("cfg", [{"mode": "whole"}, {"mode": "slide", "crop_size": 16, "stride": 8},
                                 {"mode": "whole", "scales": [0.5, 1.0], "flip": True, "average": "probs"}])
def test_non_finite_logits_stop_inference(value, cfg):
    """One NaN / inf logit anywhere (mode, scales, flip, probability average) stops with one line, never a class."""
    from setr.inference import NonFiniteLogits, infer

    x = torch.randn(2, 3, 24, 40)
    with pytest.raises(NonFiniteLogits, match=r"^logits: non-finite values \(NaN/inf\) in the network output for "
                                              r"a batch of 2 image\(s\) of 40x24"):
        infer(_Spy(value), x, cfg)
    assert torch.isfinite(infer(_Spy(), x, cfg)).all()


class _Fixed(torch.nn.Module):
    """Returns the same logits whatever the input (float32, or the dtype of ``logits``)."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits = logits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_one_non_finite_logit_anywhere_is_found(value, dtype):
    """The check is one reduction (min and max) over the logits: a single bad value at the first, a middle or the
    last position of a tensor whose size is no multiple of any vector width is found."""
    from setr.inference import NonFiniteLogits, infer

    x = torch.zeros(2, 3, 33, 47)
    clean = torch.randn(2, 5, 33, 47).to(dtype)
    for index in (0, clean.numel() // 2 + 7, clean.numel() - 1):
        bad = clean.clone()
        bad.view(-1)[index] = value
        with pytest.raises(NonFiniteLogits):
            infer(_Fixed(bad), x, {"mode": "whole"})
    torch.testing.assert_close(infer(_Fixed(clean), x, {"mode": "whole"}), clean.float(), rtol=0, atol=0)
    empty = torch.zeros(0, 5, 33, 47, dtype=dtype)  # nothing to check: no error from the reduction either
    assert infer(_Fixed(empty), x[:0], {"mode": "whole"}).shape == (0, 5, 33, 47)


def _nan_checkpoint(path: Path) -> Path:
    write_tiny_checkpoint(path, num_classes=3)
    ckpt = torch.load(path, weights_only=True)
    ckpt["state_dict"]["model.decode_head.cls.bias"][1] = float("nan")
    torch.save(ckpt, path)
    return path


def test_predict_stops_on_non_finite_logits_and_writes_no_label(tmp_path):
    from setr.tasks.predict import predict

    img = tmp_path / "photo.png"
    Image.fromarray(np.zeros((40, 56, 3), np.uint8)).save(img)
    cfg = {"ckpt_path": str(_nan_checkpoint(tmp_path / "nan.ckpt")), "input": str(img),
           "output_dir": str(tmp_path / "out"), "device": "cpu"}
    with pytest.raises(SETRConfigError, match=r"photo.png: logits: non-finite values \(NaN/inf\)"):
        predict(cfg)
    assert not list((tmp_path / "out").glob("*.png"))


def test_eval_stops_on_non_finite_logits(tmp_path):
    root = fake.make_folder(tmp_path / "data", n_train=1, n_val=2)
    proc = run_entry("eval.py", f"ckpt_path={_nan_checkpoint(tmp_path / 'nan.ckpt')}", *_folder(root),
                     log_dir=tmp_path, check=False)
    assert proc.returncode == 2 and "val/mIoU" not in proc.stdout
    assert proc.stderr.strip().splitlines()[-1].startswith("error: logits: non-finite values (NaN/inf)")


# ------------------------------------------------------------------------------- eval: the record's settings
def _folder(root: Path) -> list[str]:
    """data=folder as a user has it: the config's own test settings (resize to 520, slide 480 / 320)."""
    return ["data=folder", f"data.root={root}", "data.num_classes=3", "data.num_workers=0",
            "extras.print_config=false"]


PUBLISHED = "+published={ss: 50.0, ms: 60.0, source: test}"


def test_eval_scores_with_the_checkpoints_settings_unless_the_command_line_names_a_key(tmp_path):
    """A checkpoint validated with whole-image inference at the native size, evaluated with data=folder (whose
    defaults are a resize to 520 and 480 / 320 windows), is scored with its own settings; a key named on the
    command line wins, and the settings and their sources are said in a line and in the JSON."""
    root = fake.make_folder(tmp_path / "data", n_train=1, n_val=3)
    ckpt = write_tiny_checkpoint(tmp_path / "whole.ckpt", num_classes=3, inference={"mode": "whole"},
                                 test_pipeline=[])
    own = run_entry("eval.py", f"ckpt_path={ckpt}", *_folder(root), PUBLISHED, log_dir=tmp_path)
    out = last_json(own)
    assert out["eval/inference"] == {"mode": "whole"} and out["eval/inference_source"] == {"mode": "record"}
    assert out["eval/test_pipeline"] == [] and out["eval/test_pipeline_source"] == "record"
    assert "eval settings: test resize none (native size) (record) | inference {'mode': 'whole'} (record: mode)" \
        in own.stdout
    # whole inference without resize is neither the data config's SS test nor its MS test: no published number
    assert "published/mIoU" not in out
    assert "published: no comparison, the inference settings are not the paper's SS or MS protocol" in own.stdout

    same = last_json(run_entry("eval.py", f"ckpt_path={ckpt}", *_folder(root), "data.inference.mode=whole",
                               "data.val_pipeline=[]", log_dir=tmp_path))
    assert same["val/mIoU"] == pytest.approx(out["val/mIoU"], abs=1e-9), "scored as whole + native size"
    assert same["eval/inference_source"] == {"mode": "command line"}
    assert same["eval/test_pipeline_source"] == "command line"

    named = last_json(run_entry("eval.py", f"ckpt_path={ckpt}", *_folder(root), "data.inference.mode=slide",
                                "data.inference.crop_size=32", "data.test_scale=[100,100]", log_dir=tmp_path))
    assert named["eval/inference"] == {"mode": "slide", "crop_size": 32, "stride": [21, 21]}
    assert named["eval/inference_source"] == {"mode": "command line", "crop_size": "command line",
                                              "stride": "record (training crop)"}
    assert named["eval/test_pipeline"] == [{"_target_": "setr.data.transforms.RandomRescale",
                                            "img_scale": [100, 100], "ratio_range": None}]
    assert named["eval/test_pipeline_source"] == "command line"
    assert named["val/mIoU"] != pytest.approx(out["val/mIoU"], abs=1e-6), "another measurement"


def test_eval_refuses_a_stride_longer_than_the_window_before_any_forward(tmp_path):
    root = fake.make_folder(tmp_path / "data", n_train=1, n_val=1)
    ckpt = write_tiny_checkpoint(tmp_path / "slide.ckpt", num_classes=3,
                                 inference={"mode": "slide", "crop_size": 64, "stride": 42})
    proc = run_entry("eval.py", f"ckpt_path={ckpt}", *_folder(root), "data.inference.stride=100", log_dir=tmp_path,
                     check=False)
    assert proc.returncode == 2 and "Validation" not in proc.stdout + proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        "error: data.inference.stride: [100, 100] is longer than the window data.inference.crop_size [64, 64]: the "
        "pixels between two windows would be in none of them; use a stride <= the crop, e.g. "
        "data.inference.stride=42 (2/3 of it, the paper's ratio)")


def test_settings_sources_for_a_protocol_group_and_a_whole_node():
    """protocol=ms names the keys it sets (from conf/protocol/ms.yaml) and data.val_pipeline; the record keeps
    the windows. data.inference=... names every key."""
    from setr.checkpoint import ModelRecord
    from setr.tasks.evaluate import named_keys, test_settings

    cfg = _compose(("data=folder", "data.num_classes=3", "data.crop_size=64", "protocol=ms", "ckpt_path=x"), "eval")
    record = ModelRecord(model={"num_classes": 3}, class_names=["a", "b", "c"], palette=[], crop_size=64,
                         inference={"mode": "slide", "crop_size": 64, "stride": 32, "flip": False},
                         test_pipeline=[{"_target_": "setr.data.transforms.RandomRescale", "img_scale": [9, 9]}])
    inference, sources, pipeline, source = test_settings(cfg, record, overrides=["protocol=ms"], protocol="ms")
    assert inference == {"mode": "slide", "crop_size": 64, "stride": 32, "flip": True, "img_scale": [69, 69],
                         "scales": [0.5, 0.75, 1.0, 1.25, 1.5, 1.75], "min_short": 64, "average": "probs"}
    assert {k for k, v in sources.items() if v == "record"} == {"mode", "crop_size", "stride"}
    assert pipeline == [] and source == "command line"
    assert named_keys(["data.inference={mode: whole}"])[0] >= {"mode", "stride", "scales"}
    assert named_keys(["++data.inference.stride=3", "~data.inference.flip", "data.test_scale=[5,5]", "seed=1"]) == (
        {"stride", "flip"}, {"test_scale"})
    with pytest.raises(SETRConfigError, match=r"data.inference.strde: unknown key"):
        test_settings(cfg, record, overrides=["+data.inference.strde=3"])


# ------------------------------------------------------------------------------- the published comparison
def test_only_the_official_protocols_are_compared_with_the_published_columns():
    from setr.tasks.evaluate import protocol_of

    base = ("data=folder", "data.num_classes=3", "data.crop_size=64", "ckpt_path=x")
    cfg = _compose(base, "eval")
    ss = OmegaConf.to_container(cfg.data.inference, resolve=True)
    resize = OmegaConf.to_container(cfg.data.val_pipeline, resolve=True)
    assert protocol_of(ss, resize, cfg) == ("ss", "")
    for other in ({"flip": True}, {"scales": [0.75, 1.0, 1.25]}, {"stride": 32}, {"mode": "whole"},
                  {"average": "probs"}):
        assert protocol_of({**ss, **other}, resize, cfg)[0] is None, other
    assert protocol_of(ss, [], cfg)[0] is None, "no test resize is not the SS test"
    assert protocol_of({**ss, "batch_size": 3}, resize, cfg) == ("ss", ""), "windows per forward change nothing"
    named, why = protocol_of(ss, resize, cfg, ["data.inference.stride=42"])
    assert named is None and why == "data.inference.stride set on the command line"

    ms_cfg = _compose((*base, "protocol=ms"), "eval")
    ms = OmegaConf.to_container(ms_cfg.data.inference, resolve=True)
    assert protocol_of(ms, [], ms_cfg, ["protocol=ms"], "ms") == ("ms", "")
    for other in ({"average": "logits"}, {"min_short": None}, {"flip": False}, {"scales": [0.5, 1.0, 2.0]},
                  {"img_scale": [640, 640]}):
        assert protocol_of({**ms, **other}, [], ms_cfg, ["protocol=ms"], "ms")[0] is None, other
    assert protocol_of(ms, resize, ms_cfg, ["protocol=ms"], "ms")[0] is None, "MS starts from the original image"
    assert protocol_of(ms, [], ms_cfg, ["protocol=ms", "data.ms_ratios=[1.0,2.0]"], "ms")[0] is None


def test_no_published_number_beside_another_setting(caplog):
    from setr.tasks.evaluate import compare_published

    metrics = {"val/mIoU": 0.4}
    published = {"ss": 50.0, "ms": 60.0, "source": "paper"}
    with caplog.at_level(logging.INFO, logger="setr"):
        assert compare_published(metrics, "val", published, None, "inference {'flip': True}") == {}
    assert "published: no comparison, the inference settings are not the paper's SS or MS protocol " \
        "(inference {'flip': True})" in caplog.text
    assert compare_published(metrics, "val", published, "ms")["published/mIoU"] == pytest.approx(0.6)


# ----------------------------------------------------------------------------- large images, damaged files
def test_a_large_whole_image_forward_says_so(tmp_path, caplog, monkeypatch):
    import setr.inference as inference

    monkeypatch.setattr(inference, "_warned", set())
    ckpt = write_tiny_checkpoint(tmp_path / "w.ckpt", num_classes=3, crop=64)
    model = __import__("setr").load_model(ckpt)
    with caplog.at_level(logging.WARNING, logger="setr"):
        inference.predict_images(model, [np.zeros((300, 260, 3), np.uint8)])  # 19x the 64x64 crop
        inference.predict_images(model, [np.zeros((300, 260, 3), np.uint8)])
        inference.predict_images(model, [np.zeros((100, 100, 3), np.uint8)])
    lines = [r.getMessage() for r in caplog.records if "in mode whole" in r.getMessage()]
    assert len(lines) == 1, "once per size, none for an image near the crop"
    assert "260x300 image (0.1 Mpx, 19x the 64x64 crop)" in lines[0] and "inference.mode=slide" in lines[0]
    assert "resize" in lines[0]
    assert inference.warn_if_slow((5000, 4000)) and not inference.warn_if_slow((2000, 2000))
    assert not inference.warn_if_slow((5000, 4000)), "said once"


def _damaged(tmp_path: Path, good: Path) -> dict[str, Path]:
    data = good.read_bytes()
    files = {"empty": b"", "truncated": data[: len(data) // 2], "random": bytes(np.random.default_rng(0).integers(
        0, 256, 4096, dtype=np.uint8)), "html": b"<!DOCTYPE html><html>404</html>"}
    out = {}
    for name, content in files.items():
        out[name] = tmp_path / f"{name}.ckpt"
        out[name].write_bytes(content)
    legacy = tmp_path / "legacy.ckpt"
    torch.save({"a": torch.zeros(100)}, legacy, _use_new_zipfile_serialization=False)
    out["legacy_truncated"] = tmp_path / "legacy_truncated.ckpt"
    out["legacy_truncated"].write_bytes(legacy.read_bytes()[:200])
    return out


@pytest.mark.parametrize(("name", "why"), [
    ("empty", "the file is empty (0 bytes"), ("truncated", "it is truncated or damaged"),
    ("random", "it is not a torch file"), ("html", "text / HTML page"),
    ("legacy_truncated", "it is truncated or damaged")])
def test_a_damaged_checkpoint_is_named_as_such_not_sent_to_trust_pickle(tmp_path, name, why):
    from setr.files import UnreadableCheckpoint, read_torch_file

    path = _damaged(tmp_path, write_tiny_checkpoint(tmp_path / "good.ckpt", num_classes=3))[name]
    with pytest.raises(UnreadableCheckpoint) as e:
        read_torch_file(path)
    msg = str(e.value)
    assert msg.startswith(f"ckpt_path: {path} is not a readable checkpoint: ") and why in msg, msg
    assert "trust-pickle" not in msg and "unpickling" not in msg and "\n" not in msg


def test_eval_predict_and_export_name_a_damaged_file(tmp_path):
    from setr.tasks.export import export
    from setr.tasks.predict import predict

    path = _damaged(tmp_path, write_tiny_checkpoint(tmp_path / "good.ckpt", num_classes=3))["random"]
    img = tmp_path / "in.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(img)
    with pytest.raises(SETRConfigError, match=r"random\.ckpt is not a readable checkpoint: it is not a torch file"):
        predict({"ckpt_path": str(path), "input": str(img), "output_dir": str(tmp_path / "o"), "device": "cpu"})
    with pytest.raises(SETRConfigError, match=r"random\.ckpt is not a readable checkpoint") as e:
        export(path, format="torchscript", output=tmp_path / "m.pt")
    assert "trust-pickle" not in str(e.value)
    proc = run_entry("eval.py", f"ckpt_path={path}", "extras.print_config=false", log_dir=tmp_path, check=False)
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert "random.ckpt is not a readable checkpoint: it is not a torch file" in last and "trust-pickle" not in last


def test_a_real_pickle_still_gets_the_trust_pickle_hint(tmp_path):
    from setr.files import UnreadableCheckpoint, read_torch_file

    risky = tmp_path / "risky.ckpt"
    torch.save({"obj": Path("x")}, risky)
    with pytest.raises(SETRConfigError, match=r"needs arbitrary unpickling.*--trust-pickle") as e:
        read_torch_file(risky)
    assert not isinstance(e.value, UnreadableCheckpoint)
