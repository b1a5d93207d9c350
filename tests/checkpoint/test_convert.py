"""setr-convert (python -m setr.convert): released SETR checkpoints (official fudan-zvg/SETR, mmsegmentation) ->
this project.

The foreign files are written from tiny models of this project by an INVERSE key map derived from the foreign
modules' own structure (github.com/fudan-zvg/SETR: mmseg/models/backbones/``vit.py`` / ``vit_mla.py``,
decode_heads/``vit_up_head.py`` / ``vit_mla_head.py`` / ``vit_mla_auxi_head.py``; mmsegmentation's
``VisionTransformer`` / ``SETRUPHead`` / ``MLANeck`` / ``SETRMLAHead`` / ``FCNHead``), not from the converter,
so a wrong mapping in the converter shows as different logits.
"""

from __future__ import annotations

import fractions
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import tiny_model_cfg
from pipeline import TINY, last_json, run_entry
from setr import load_model
from setr.checkpoint import read_checkpoint
from setr.checkpoint.convert import main
from setr.errors import SETRConfigError
from setr.models import build_setr

CLASSES = ["sky", "road", "car", "tree", "wall"]
PALETTE = [[10, 20, 30], [40, 50, 60], [70, 80, 90], [100, 110, 120], [130, 140, 150]]
FLAGS = ["--out-indices", "0,1,2,3", "--num-heads", "2"]


# ----------------------------------------------------------------------------------- foreign layouts
def _vit_official(k: str) -> str:
    """Ours ``encoder.vit.*`` -> official ``backbone.*``: the official ViT is a copy of timm's (same names)."""
    return "backbone." + k[len("encoder.vit."):]


MMSEG_VIT = [  # timm / ours -> mmseg VisionTransformer (TransformerEncoderLayer, mmcv MultiheadAttention, FFN)
    (r"blocks\.(\d+)\.norm1\.", r"layers.\1.ln1."),
    (r"blocks\.(\d+)\.attn\.qkv\.weight", r"layers.\1.attn.attn.in_proj_weight"),
    (r"blocks\.(\d+)\.attn\.qkv\.bias", r"layers.\1.attn.attn.in_proj_bias"),
    (r"blocks\.(\d+)\.attn\.proj\.", r"layers.\1.attn.attn.out_proj."),
    (r"blocks\.(\d+)\.norm2\.", r"layers.\1.ln2."),
    (r"blocks\.(\d+)\.mlp\.fc1\.", r"layers.\1.ffn.layers.0.0."),
    (r"blocks\.(\d+)\.mlp\.fc2\.", r"layers.\1.ffn.layers.1."),
    (r"patch_embed\.proj\.", r"patch_embed.projection."),
]


def _vit_mmseg(k: str) -> str:
    k = k[len("encoder.vit."):]
    for pat, rep in MMSEG_VIT:
        k = re.sub("^" + pat, rep, k)
    return "backbone." + k


def _official_up(rest: str, n_stages: int) -> str:
    """VisionTransformerUpHead: conv_i (nn.Conv2d) + syncbn_fc_i per stage, the classifier is conv_<n_stages>."""
    if rest.startswith("norm."):
        return rest
    if rest.startswith("cls."):
        return f"conv_{n_stages}." + rest[4:]
    j, part, tail = re.match(r"stages\.(\d+)\.(\d)\.(.*)", rest).groups()
    return (f"conv_{j}." if part == "0" else f"syncbn_fc_{j}.") + tail


def _mmseg_up(rest: str) -> str:
    """SETRUPHead: norm, up_convs[j] = Sequential(ConvModule(conv, bn, activate), Upsample), conv_seg."""
    if rest.startswith("norm."):
        return rest
    if rest.startswith("cls."):
        return "conv_seg." + rest[4:]
    j, part, tail = re.match(r"stages\.(\d+)\.(\d)\.(.*)", rest).groups()
    return f"up_convs.{j}.0.{'conv' if part == '0' else 'bn'}.{tail}"


def official_state(model) -> dict[str, torch.Tensor]:
    """The state dict the official code's modules would hold for ``model`` (official structure)."""
    out = {}
    heads = {"decode_head": model.decode_head, **{f"auxiliary_heads.{i}": h for i, h in
                                                  enumerate(model.auxiliary_heads)}}
    for k, v in model.state_dict().items():
        if k.startswith("encoder.vit."):
            out[_vit_official(k)] = v
            continue
        if k.startswith("neck."):  # Conv_MLA inside the backbone; norm_i; mla_p{i+2}_1x1 / mla_p{i+2} = (conv, bn)
            kind, i, rest = re.match(r"neck\.(norms|proj|fuse)\.(\d+)\.(.*)", k).groups()
            i = int(i)
            if kind == "norms":
                out[f"backbone.norm_{i}.{rest}"] = v
            else:
                out[f"backbone.mla.mla_p{i + 2}{'_1x1' if kind == 'proj' else ''}.{rest}"] = v
            continue
        head_key, rest = re.match(r"(decode_head|auxiliary_heads\.\d+)\.(.*)", k).groups()
        src = "decode_head" if head_key == "decode_head" else "auxiliary_head." + head_key.split(".")[1]
        head = heads[head_key]
        if hasattr(head, "branches"):  # MLAHead: head{k+2} = Sequential(conv, bn, relu, conv, bn, relu); cls
            if rest.startswith("cls."):
                out[f"{src}.cls.{rest[4:]}"] = v
            else:
                b, m, part, tail = re.match(r"branches\.(\d+)\.(\d)\.(\d)\.(.*)", rest).groups()
                idx = {("0", "0"): 0, ("0", "1"): 1, ("1", "0"): 3, ("1", "1"): 4}[(m, part)]
                out[f"{src}.mlahead.head{int(b) + 2}.{idx}.{tail}"] = v
        elif hasattr(head, "stages"):
            out[f"{src}.{_official_up(rest, len(head.stages))}"] = v
        else:  # VIT_MLA_AUXIHead(in_channels=256): aux (1x1, no bias)
            out[f"{src}.aux.{rest[4:]}"] = v
    # every official head also holds BaseDecodeHead's unused conv_seg (channels=512 in the configs)
    n = model.num_classes
    for src in ["decode_head"] + [f"auxiliary_head.{i}" for i in range(len(model.auxiliary_heads))]:
        out[f"{src}.conv_seg.weight"] = torch.randn(n, 512, 1, 1)
        out[f"{src}.conv_seg.bias"] = torch.randn(n)
    return out


def mmseg_state(model) -> dict[str, torch.Tensor]:
    """The state dict mmsegmentation's SETR modules would hold for ``model`` (the ``*_mmseg`` structure)."""
    out = {}
    for k, v in model.state_dict().items():
        if k.startswith("encoder.vit."):
            out[_vit_mmseg(k)] = v
            continue
        if k.startswith("neck."):  # MLANeck: norm[i]; mla.channel_proj[i] / feat_extract[k] = ConvModule(conv, bn)
            kind, i, rest = re.match(r"neck\.(norms|proj|fuse)\.(\d+)\.(.*)", k).groups()
            if kind == "norms":
                out[f"neck.norm.{i}.{rest}"] = v
            else:
                part, tail = rest.split(".", 1)
                name = "channel_proj" if kind == "proj" else "feat_extract"
                out[f"neck.mla.{name}.{i}.{'conv' if part == '0' else 'bn'}.{tail}"] = v
            continue
        head_key, rest = re.match(r"(decode_head|auxiliary_heads\.\d+)\.(.*)", k).groups()
        src = "decode_head" if head_key == "decode_head" else "auxiliary_head." + head_key.split(".")[1]
        if rest.startswith("branches."):  # SETRMLAHead: up_convs[k] = Sequential(ConvModule, ConvModule, Upsample)
            b, m, part, tail = re.match(r"branches\.(\d+)\.(\d)\.(\d)\.(.*)", rest).groups()
            out[f"{src}.up_convs.{b}.{m}.{'conv' if part == '0' else 'bn'}.{tail}"] = v
        elif rest.startswith(("stages.", "norm.")):
            out[f"{src}.{_mmseg_up(rest)}"] = v
        else:  # SETRUPHead / SETRMLAHead / FCNHead(num_convs=0) classifier
            out[f"{src}.conv_seg.{rest[4:]}"] = v
    return out


def random_model(head: str, seed: int = 0, num_classes: int = 5):
    """A tiny SETR of ``head`` with random weights and BatchNorm statistics away from their defaults."""
    torch.manual_seed(seed)
    model = build_setr(tiny_model_cfg(head, 64, num_classes))
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if name.endswith("running_var"):
                t.copy_(torch.rand_like(t) + 0.5)
            elif name.endswith("num_batches_tracked"):
                t.fill_(123)
            elif t.is_floating_point():
                t.copy_(torch.randn_like(t) * (0.2 if t.dim() > 1 else 0.5))
    return model.eval()


def write_released(path: Path, model, layout: str, meta: dict | None = None) -> Path:
    state = official_state(model) if layout == "official" else mmseg_state(model)
    meta = {"CLASSES": tuple(CLASSES), "PALETTE": PALETTE} if meta is None else meta
    torch.save({"meta": meta, "state_dict": state}, path)
    return path


def _x(seed: int = 1) -> torch.Tensor:
    return torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(seed))


# -------------------------------------------------------------------------------------- equal logits
CASES = [("official", "naive", 3), ("official", "pup", 4), ("official", "mla", 4),
         ("mmseg", "naive_mmseg", 3), ("mmseg", "naive_mmseg_cityscapes", 3), ("mmseg", "pup_mmseg", 3),
         ("mmseg", "mla_mmseg", 4)]


@pytest.mark.parametrize(("layout", "head", "aux"), CASES)
def test_converted_logits_equal_the_source_models(tmp_path, capsys, layout, head, aux):
    model = random_model(head)
    src = write_released(tmp_path / "released.pth", model, layout)
    assert main([str(src), str(tmp_path / "out.ckpt"), *FLAGS]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2, lines
    summary = json.loads(lines[-1])
    assert summary["layout"] == layout and summary["aux_heads"] == aux and summary["classes"] == 5
    assert summary["crop"] == 64 and summary["out_indices"] == [0, 1, 2, 3] and summary["embed_dim"] == 64
    assert summary["head"] == head.replace("_cityscapes", "")
    dropped = list(summary["dropped"])
    assert all(k.endswith(("conv_seg.weight", "conv_seg.bias")) for k in dropped)
    assert len(dropped) == (2 * (aux + 1) if layout == "official" else 0)
    assert f"{aux} aux heads" in lines[0] and "tensors mapped" in lines[0]

    with torch.no_grad():
        want = model(_x())
        for dst in ("out.ckpt", "out.safetensors"):
            if dst.endswith("safetensors"):
                assert main([str(src), str(tmp_path / dst), *FLAGS]) == 0
            loaded = load_model(tmp_path / dst)
            torch.testing.assert_close(loaded(_x()), want, atol=1e-5, rtol=0)
            assert loaded.record.class_names == CLASSES and loaded.record.palette[:5] == PALETTE
            assert loaded.record.crop_size == [64, 64] and loaded.record.inference == {"mode": "whole"}
        # training mode: the auxiliary heads too
        loaded.train(), model.train()
        got, ref = loaded(_x()), model(_x())
        for a, b in zip(got["aux"], ref["aux"], strict=True):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_data_preset_gives_classes_inference_and_test_resize(tmp_path, capsys):
    """No meta: --data's class names and palette; its slide settings at the weights' crop; its val_pipeline."""
    model = random_model("naive", num_classes=19)
    src = write_released(tmp_path / "r.pth", model, "official", meta={})
    assert main([str(src), str(tmp_path / "o.ckpt"), *FLAGS, "--data", "cityscapes"]) == 0
    rec = load_model(tmp_path / "o.ckpt").record
    from setr.data.palettes import CITYSCAPES_CLASSES

    assert rec.class_names == list(CITYSCAPES_CLASSES)
    assert rec.inference["mode"] == "slide" and rec.inference["crop_size"] == 64
    assert rec.inference["stride"] == round(512 * 64 / 768)  # the preset's stride / crop ratio
    assert rec.test_pipeline and rec.test_pipeline[0]["img_scale"] == [2049, 1025]
    # no meta and no --data: numbered classes
    assert main([str(src), str(tmp_path / "p.ckpt"), *FLAGS]) == 0
    assert load_model(tmp_path / "p.ckpt").record.class_names[:2] == ["class_0", "class_1"]


def test_dist_token_and_bare_state_dict(tmp_path, capsys):
    """A DeiT-style backbone.dist_token (two prefix tokens) and a file that is a bare state dict."""
    torch.manual_seed(0)
    cfg = tiny_model_cfg("naive", 64, 5)
    cfg["encoder"]["name"] = "deit_base_distilled_patch16"
    model = build_setr(cfg).eval()
    state = official_state(model)
    assert "backbone.dist_token" in state and state["backbone.pos_embed"].shape[1] == 16 + 2
    torch.save(state, tmp_path / "deit.pth")
    assert main([str(tmp_path / "deit.pth"), str(tmp_path / "deit.ckpt"), *FLAGS]) == 0
    loaded = load_model(tmp_path / "deit.ckpt")
    assert loaded.record.model["encoder"]["name"] == "deit_base_distilled_patch16"
    with torch.no_grad():
        torch.testing.assert_close(loaded(_x()), model(_x()), atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------- errors
def _error(capsys, *argv) -> str:
    assert main([str(a) for a in argv]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def test_bad_flags_and_unknown_layouts_are_one_line(tmp_path, capsys):
    src = write_released(tmp_path / "r.pth", random_model("naive"), "official")
    dst = tmp_path / "o.ckpt"
    assert "--out-indices" in _error(capsys, src, dst, "--num-heads", "2")  # depth 4: no default
    assert "--num-heads" in _error(capsys, src, dst, "--out-indices", "0,1,2,3")  # width 64: no default
    assert "does not divide" in _error(capsys, src, dst, "--out-indices", "0,1,2,3", "--num-heads", "3")
    assert "comma-separated integers" in _error(capsys, src, dst, "--out-indices", "a,b", "--num-heads", "2")
    assert "increasing" in _error(capsys, src, dst, "--out-indices", "0,1,2,9", "--num-heads", "2")
    assert "increasing" in _error(capsys, src, dst, "--out-indices", "3,2,1,0", "--num-heads", "2")
    assert "3 auxiliary heads" in _error(capsys, src, dst, "--out-indices", "2,3", "--num-heads", "2")
    assert "unknown data preset" in _error(capsys, src, dst, *FLAGS, "--data", "coco")
    assert "150 classes, the checkpoint predicts 5" in _error(capsys, src, dst, *FLAGS, "--data", "ade20k")
    assert "not found" in _error(capsys, tmp_path / "missing.pth", dst, *FLAGS)
    torch.save({"state_dict": {"foo.weight": torch.zeros(2)}}, tmp_path / "foreign.pth")
    assert "not a released SETR checkpoint" in _error(capsys, tmp_path / "foreign.pth", dst, *FLAGS)
    state = official_state(random_model("naive"))
    state["decode_head.extra_conv.weight"] = torch.zeros(1)
    torch.save({"state_dict": state}, tmp_path / "extra.pth")
    assert "no known SETR module" in _error(capsys, tmp_path / "extra.pth", dst, *FLAGS)
    del state["decode_head.extra_conv.weight"], state["decode_head.syncbn_fc_0.running_var"]
    torch.save({"state_dict": state}, tmp_path / "short.pth")
    assert "syncbn_fc_0.running_var missing" in _error(capsys, tmp_path / "short.pth", dst, *FLAGS)
    assert not dst.exists()


def test_pickled_objects_are_refused_unless_trusted_and_numpy_meta_loads(tmp_path, capsys):
    model = random_model("naive")
    risky = write_released(tmp_path / "risky.pth", model, "official",
                           meta={"CLASSES": CLASSES, "PALETTE": PALETTE, "lr": fractions.Fraction(1, 3)})
    err = _error(capsys, risky, tmp_path / "o.ckpt", *FLAGS)
    assert "needs arbitrary unpickling" in err and "fractions.Fraction" in err and "not unpickled" in err
    assert err.endswith("pass --trust-pickle if you trust its source")
    with pytest.raises(SETRConfigError, match="needs arbitrary unpickling") as e:
        read_checkpoint(risky)
    assert "\n" not in str(e.value)
    assert main([str(risky), str(tmp_path / "o.ckpt"), *FLAGS, "--trust-pickle"]) == 0
    assert load_model(tmp_path / "o.ckpt").record.class_names == CLASSES
    # numpy arrays, scalars and dtypes (as old mmseg meta may hold) load without --trust-pickle
    np_meta = {"CLASSES": np.array(CLASSES), "PALETTE": np.array(PALETTE, dtype=np.uint8), "seed": np.int64(3),
               "dtype": np.dtype("float32"), "hook_msgs": {"best": np.float64(0.5)}, "config": "model = dict()"}
    ok = write_released(tmp_path / "np.pth", model, "official", meta=np_meta)
    assert main([str(ok), str(tmp_path / "np.ckpt"), *FLAGS]) == 0
    assert load_model(tmp_path / "np.ckpt").record.palette[:5] == PALETTE


def test_load_model_converts_a_released_file_in_memory(tmp_path, capsys):
    """The one loader takes released files as eval, predict and export do: converted in memory, a line says so,
    the logits are those of the model the file was written from."""
    source = random_model("naive")
    src = write_released(tmp_path / "r.pth", source, "official")
    model = load_model(src, convert={"num_heads": 2, "out_indices": [0, 1, 2, 3]})
    assert "converted in memory (setr-convert defaults)" in capsys.readouterr().out
    assert model.record.class_names == CLASSES and not model.training
    with torch.no_grad():
        torch.testing.assert_close(model(_x()), source(_x()), atol=1e-5, rtol=0)
    with pytest.raises(SETRConfigError, match=r"convert.out_indices=\[a,b,c,d\]"):
        load_model(src, convert={"num_heads": 2})
    # convert.data: a data preset for the record's inference settings, as setr-convert --data
    ade = write_released(tmp_path / "ade.pth", random_model("naive", num_classes=150), "official", meta={})
    rec = load_model(ade, convert={"num_heads": 2, "out_indices": [0, 1, 2, 3], "data": "ade20k"}).record
    assert rec.inference["mode"] == "slide" and rec.test_pipeline and rec.class_names[:2] == ["wall", "building"]


# ------------------------------------------------------------------------------------------ end to end
def test_predict_takes_a_released_file(tmp_path):
    src = write_released(tmp_path / "r.pth", random_model("pup_mmseg"), "mmseg")
    img = tmp_path / "in.png"
    Image.fromarray((np.random.default_rng(0).random((64, 80, 3)) * 255).astype(np.uint8)).save(img)
    proc = run_entry("predict.py", f"ckpt_path={src}", f"input={img}", f"output_dir={tmp_path / 'out'}",
                     "device=cpu", "convert.num_heads=2", "convert.out_indices=[0,1,2,3]", log_dir=tmp_path)
    assert "converted in memory" in proc.stdout and "mmseg pup_mmseg" in proc.stdout
    assert last_json(proc)["processed"] == 1
    assert Image.open(tmp_path / "out" / "in_label.png").size == (80, 64)


@pytest.mark.slow
def test_eval_takes_a_released_file(tmp_path):
    src = write_released(tmp_path / "r.pth", random_model("naive", num_classes=4), "official", meta={})
    proc = run_entry("eval.py", *TINY, f"ckpt_path={src}", "convert.num_heads=2", "convert.out_indices=[0,1,2,3]",
                     log_dir=tmp_path)
    assert "converted in memory" in proc.stdout and "official naive" in proc.stdout
    out = last_json(proc)
    assert 0.0 <= out["val/mIoU"] <= 1.0 and "val/IoU/disc" in out  # the synthetic data's class names


def test_export_takes_a_converted_safetensors_file(tmp_path, capsys):
    from setr.tasks.export import export

    src = write_released(tmp_path / "r.pth", random_model("mla"), "official")
    assert main([str(src), str(tmp_path / "o.safetensors"), *FLAGS]) == 0
    result = export(tmp_path / "o.safetensors", format="torchscript", output=tmp_path / "m.pt")
    assert result["check_passed"] and result["class_names"] == CLASSES
