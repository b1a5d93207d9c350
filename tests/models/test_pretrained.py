"""ImageNet weights (model.encoder.pretrained): every supported file layout, written here from a tiny timm ViT,
loads into a tiny ViTEncoder that then computes what the source model computes (position embeddings resampled
bilinearly when the crop differs); a missing file, a wrong hash and a pickled file stop with one line; ``none``
trains from scratch. Nothing is downloaded."""

from __future__ import annotations

import argparse
import hashlib
import logging

import numpy as np
import pytest
import timm
import torch
from timm.models.vision_transformer import checkpoint_filter_fn

from setr.errors import SETRConfigError
from setr.models.encoder import ViTEncoder
from setr.models.pretrained import KNOWN_WEIGHTS, check_pretrained_file, pretrained_path
from setr.utils.config import check_config, check_pretrained

ARCH = {"embed_dim": 64, "depth": 4, "num_heads": 2}
TIMM = {"vit": ("vit_tiny_patch16_384", "vit_tiny_patch16"),
        "deit": ("deit_base_distilled_patch16_384", "deit_base_distilled_patch16")}


# ------------------------------------------------------------------------------------------------ helpers
def source_vit(kind: str = "vit", img_size: int = 64, seed: int = 1) -> torch.nn.Module:
    """A tiny timm ViT with a classifier (and DeiT's distillation head), random but fixed weights."""
    torch.manual_seed(seed)
    vit = timm.create_model(TIMM[kind][0], pretrained=False, img_size=img_size, num_classes=10, **ARCH)
    with torch.no_grad():  # timm zero-initialises some tensors (biases, pos_embed in places): make them all matter
        for p in vit.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return vit.eval()


def encoder(kind: str = "vit", crop: int = 64, **kw) -> ViTEncoder:
    return ViTEncoder(TIMM[kind][1], img_size=crop, arch=ARCH, **kw).eval()


def reference_maps(src: torch.nn.Module, kind: str, crop: int, x: torch.Tensor) -> torch.Tensor:
    """What the source network computes at ``crop``: timm's own model of that size, filled by timm's own checkpoint
    filter (bilinear pos-embed resampling, as SETR), final norm off; the last block's patch tokens as NCHW."""
    ref = timm.create_model(TIMM[kind][0], pretrained=False, img_size=crop, num_classes=10, **ARCH).eval()
    state = checkpoint_filter_fn(src.state_dict(), ref, interpolation="bilinear", antialias=False)
    ref.load_state_dict(state)
    ref.norm = torch.nn.Identity()
    with torch.no_grad():
        tokens = ref.forward_features(x)[:, ref.num_prefix_tokens:]
    b, _, h, w = x.shape
    return tokens.reshape(b, h // 16, w // 16, -1).permute(0, 3, 1, 2)


def write_npz(vit: torch.nn.Module, path) -> None:
    """The original ViT release's layout (``Transformer/encoderblock_N/...``), with the shapes timm's
    ``_load_weights`` reads (JAX kernels: (in, out); attention (D, heads, head_dim))."""
    sd = {k: v.detach().numpy() for k, v in vit.state_dict().items()}
    d = vit.embed_dim
    h = vit.blocks[0].attn.num_heads
    out = {
        "embedding/kernel": sd["patch_embed.proj.weight"].transpose(2, 3, 1, 0),
        "embedding/bias": sd["patch_embed.proj.bias"],
        "cls": sd["cls_token"],
        "Transformer/posembed_input/pos_embedding": sd["pos_embed"],
        "Transformer/encoder_norm/scale": sd["norm.weight"],
        "Transformer/encoder_norm/bias": sd["norm.bias"],
        "head/kernel": sd["head.weight"].T,
        "head/bias": sd["head.bias"],
    }
    for i in range(len(vit.blocks)):
        b, p = f"Transformer/encoderblock_{i}/", f"blocks.{i}."
        mha = b + "MultiHeadDotProductAttention_1/"
        out[b + "LayerNorm_0/scale"], out[b + "LayerNorm_0/bias"] = sd[p + "norm1.weight"], sd[p + "norm1.bias"]
        out[b + "LayerNorm_2/scale"], out[b + "LayerNorm_2/bias"] = sd[p + "norm2.weight"], sd[p + "norm2.bias"]
        qkv_w, qkv_b = sd[p + "attn.qkv.weight"], sd[p + "attn.qkv.bias"]
        for j, n in enumerate(("query", "key", "value")):
            out[mha + f"{n}/kernel"] = qkv_w[j * d:(j + 1) * d].T.reshape(d, h, d // h)
            out[mha + f"{n}/bias"] = qkv_b[j * d:(j + 1) * d].reshape(h, d // h)
        out[mha + "out/kernel"] = sd[p + "attn.proj.weight"].reshape(d, h, d // h).transpose(1, 2, 0)
        out[mha + "out/bias"] = sd[p + "attn.proj.bias"]
        for r in range(2):
            out[b + f"MlpBlock_3/Dense_{r}/kernel"] = sd[p + f"mlp.fc{r + 1}.weight"].T
            out[b + f"MlpBlock_3/Dense_{r}/bias"] = sd[p + f"mlp.fc{r + 1}.bias"]
    np.savez(path, **{k: np.ascontiguousarray(v) for k, v in out.items()})


def to_mmseg(state: dict) -> dict:
    """mmsegmentation's tools/model_converters/vit2mmseg.py ``convert_vit`` (head dropped, norm -> ln1)."""
    out = {}
    for k, v in state.items():
        if k.startswith("head"):
            continue
        if k.startswith("norm"):
            k = k.replace("norm.", "ln1.")
        elif k.startswith("patch_embed"):
            k = k.replace("proj", "projection")
        elif k.startswith("blocks"):
            if "norm" in k:
                k = k.replace("norm", "ln")
            elif "mlp.fc1" in k:
                k = k.replace("mlp.fc1", "ffn.layers.0.0")
            elif "mlp.fc2" in k:
                k = k.replace("mlp.fc2", "ffn.layers.1")
            elif "attn.qkv" in k:
                k = k.replace("attn.qkv.", "attn.attn.in_proj_")
            elif "attn.proj" in k:
                k = k.replace("attn.proj", "attn.attn.out_proj")
            k = k.replace("blocks.", "layers.")
        out[k] = v.clone()
    return out


def write(fmt: str, vit: torch.nn.Module, tmp_path):
    state = {k: v.detach().clone() for k, v in vit.state_dict().items()}
    if fmt == "pth":
        path = tmp_path / "w.pth"
        torch.save(state, path)
    elif fmt == "bin":  # wrapped and prefixed, as training scripts save
        path = tmp_path / "w.bin"
        torch.save({"state_dict": {"module." + k: v for k, v in state.items()}}, path)
    elif fmt == "safetensors":
        from safetensors.torch import save_file

        path = tmp_path / "w.safetensors"
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    elif fmt == "npz":
        path = tmp_path / "w.npz"
        write_npz(vit, path)
    elif fmt == "mmseg":
        path = tmp_path / "w_mmseg.pth"
        torch.save(to_mmseg(state), path)
    elif fmt == "mmseg_segmentor":  # a whole mmseg model: backbone.* beside the heads
        path = tmp_path / "seg.pth"
        heads = {"decode_head.conv_seg.weight": torch.zeros(3, 8, 1, 1), "decode_head.conv_seg.bias": torch.zeros(3)}
        torch.save({"state_dict": {**{"backbone." + k: v for k, v in to_mmseg(state).items()}, **heads}}, path)
    else:  # DeiT's own release: {"model": state}
        path = tmp_path / "deit.pth"
        torch.save({"model": state}, path)
    return path


# ------------------------------------------------------------------------------------------------- formats
@pytest.mark.parametrize("fmt", ["pth", "bin", "safetensors", "npz", "mmseg", "mmseg_segmentor"])
@pytest.mark.parametrize("crop", [64, 96])  # the source's grid (4x4) and a resampled one (6x6)
def test_every_format_computes_what_the_source_computes(tmp_path, caplog, fmt, crop):
    src = source_vit("vit", img_size=64)
    path = write(fmt, src, tmp_path)
    enc = encoder("vit", crop)
    with caplog.at_level(logging.INFO, logger="setr"):
        result = enc.load_pretrained(path)
    assert result == {"missing": [], "unexpected": []}
    torch.manual_seed(0)
    x = torch.randn(2, 3, crop, crop)
    with torch.no_grad():
        got = enc(x)[-1]
    ref = reference_maps(src, "vit", crop, x)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)

    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("pretrained ")]
    assert len(lines) == 1, lines
    line = lines[0]
    assert line.startswith(f"pretrained {path}: ") and "52 tensors loaded" in line  # 4 blocks x 12 + 4
    assert ("pos_embed 4x4 (kept)" if crop == 64 else "pos_embed 4x4 -> 6x6") in line
    assert "missing: none; unexpected: none" in line
    dropped = {"mmseg": "norm.bias, norm.weight",  # vit2mmseg leaves the classifier out itself
               "mmseg_segmentor": "decode_head.conv_seg.bias, decode_head.conv_seg.weight, norm.bias, norm.weight"}
    assert f"dropped: {dropped.get(fmt, 'head.bias, head.weight, norm.bias, norm.weight')};" in line


def test_deit_distilled_release_layout(tmp_path, caplog):
    """DeiT's file: weights under "model", two prefix tokens (cls + distillation) with position embeddings, two
    classifiers (head, head_dist) dropped."""
    src = source_vit("deit", img_size=64)
    path = write("deit", src, tmp_path)
    enc = encoder("deit", 96, drop_prefix_tokens=False)
    with caplog.at_level(logging.INFO, logger="setr"):
        enc.load_pretrained(path)
    x = torch.randn(1, 3, 96, 96)
    with torch.no_grad():
        torch.testing.assert_close(enc(x)[-1], reference_maps(src, "deit", 96, x), rtol=1e-4, atol=1e-5)
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("pretrained "))
    assert "53 tensors loaded, pos_embed 4x4 -> 6x6" in line
    assert "dropped: head.bias, head.weight, head_dist.bias, head_dist.weight, norm.bias, norm.weight;" in line


def test_the_config_loads_the_file_at_build_time(tmp_path):
    from conftest import tiny_model_cfg
    from setr.models import build_setr

    src = source_vit("vit", img_size=64)
    path = write("npz", src, tmp_path)
    model = build_setr(tiny_model_cfg("naive", 64, 5, f"model.encoder.pretrained={path}"))
    torch.testing.assert_close(model.encoder.vit.pos_embed, src.pos_embed)


# -------------------------------------------------------------------------------------------------- errors
def test_pickled_file_is_refused_with_one_line(tmp_path):
    src = source_vit()
    path = tmp_path / "pickled.pth"
    torch.save({**src.state_dict(), "args": argparse.Namespace(lr=0.1)}, path)
    with pytest.raises(SETRConfigError) as e:
        encoder().load_pretrained(path)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"model.encoder.pretrained: {path} needs arbitrary unpickling")
    assert "(argparse.Namespace)" in msg
    assert msg.endswith("re-save its tensors alone (torch.save(state_dict) or safetensors)")


def test_weights_of_another_encoder_name_the_file(tmp_path):
    path = write("deit", source_vit("deit"), tmp_path)  # 2 prefix tokens into a 1-prefix ViT
    with pytest.raises(SETRConfigError, match=r"deit\.pth: pos_embed \(1, 18, 64\) has 17 patch positions"):
        encoder("vit").load_pretrained(path)
    path = tmp_path / "no_dist.pth"
    torch.save({k: v for k, v in source_vit("deit").state_dict().items() if k != "dist_token"}, path)
    with pytest.raises(SETRConfigError, match=r"no_dist\.pth: checkpoint lacks 1 encoder weights, e\.g\. \['dist_"):
        encoder("deit").load_pretrained(path)
    bad = tmp_path / "w.npz"
    np.savez(bad, x=np.zeros(3))
    with pytest.raises(SETRConfigError, match=r"w\.npz: not a ViT \.npz of the original release"):
        encoder().load_pretrained(bad)


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_hash_in_the_file_name_is_checked(tmp_path, caplog):
    src = source_vit()
    plain = write("pth", src, tmp_path)
    good = tmp_path / f"vit_tiny-{_sha(plain)[:8]}.pth"
    good.write_bytes(plain.read_bytes())
    encoder().load_pretrained(good)  # verified, loads
    assert check_pretrained_file(str(good)) == good

    truncated = tmp_path / f"vit_tiny-{_sha(plain)[:10]}.pth"
    truncated.write_bytes(plain.read_bytes()[:-1000])  # an interrupted download
    for call in (lambda: encoder().load_pretrained(truncated), lambda: check_pretrained_file(str(truncated))):
        with pytest.raises(SETRConfigError) as e:
            call()
        msg = str(e.value)
        assert "\n" not in msg and msg.startswith(f"{truncated}: sha256 ")
        assert f"does not match the '{_sha(plain)[:10]}' in its name: the file is truncated or corrupt" in msg


# ------------------------------------------------------------------------------------------ config / presets
def _train_cfg(*overrides: str):
    from conftest import _compose

    return _compose(tuple(overrides), "train")


PRESET_FILES = {"ade20k_pup_b16": ("vit_large_patch16", "jx_vit_large_p16_384-b3be5167.pth"),
                "cityscapes_naive_base_40k": ("vit_base_patch16", "jx_vit_base_p16_384-83fb41ba.pth"),
                "pascal_context_mla_deit_b16": ("deit_base_distilled_patch16",
                                                "deit_base_distilled_patch16_384-d0272ac0.pth")}


@pytest.mark.parametrize("preset", PRESET_FILES)
def test_presets_name_the_paper_file_and_stop_when_it_is_missing(tmp_path, preset):
    encoder_name, file = PRESET_FILES[preset]
    cfg = _train_cfg(f"experiment={preset}", f"paths.weights_dir={tmp_path}")
    assert cfg.model.encoder.name == encoder_name and cfg.model.encoder.pretrained == f"{tmp_path}/{file}"
    with pytest.raises(SETRConfigError) as e:
        check_pretrained(cfg)
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith(f"model.encoder.pretrained: weights file {tmp_path}/{file} not found; download ")
    src = KNOWN_WEIGHTS[file]
    assert src.url in msg and f"(timm {src.timm_name}: " in msg and msg.endswith("=none to train from scratch")

    (tmp_path / file).write_bytes(b"a truncated download")  # present but wrong: the hash stops it here too
    with pytest.raises(SETRConfigError, match=r"sha256 .* does not match the '[0-9a-f]{8}' in its name"):
        check_pretrained(cfg)


def test_small_and_test_encoders_keep_no_weights():
    for enc in ("vit_tiny", "vit_test"):
        assert _train_cfg(f"model/encoder={enc}").model.encoder.pretrained is None
    assert _train_cfg().model.encoder.pretrained is None  # the default setr_small


@pytest.mark.parametrize("value", ["none", "None", "null", "NULL"])
def test_pretrained_none_trains_from_scratch(tmp_path, caplog, value):
    cfg = _train_cfg("experiment=ade20k_pup_b16", f"paths.weights_dir={tmp_path}", f"model.encoder.pretrained={value}")
    with caplog.at_level(logging.INFO, logger="setr"):
        check_pretrained(cfg)  # no file needed
    assert cfg.model.encoder.pretrained is None  # what build() hands SETRModule
    assert any("model.encoder.pretrained=none: the encoder (vit_large_patch16) starts from random weights"
               in r.getMessage() for r in caplog.records)
    assert pretrained_path(value) is None
    enc = ViTEncoder("vit_tiny_patch16", img_size=32, arch=ARCH, pretrained=value)  # builds, loads nothing
    assert enc.load_pretrained(value) == {"missing": [], "unexpected": []}


def test_no_weights_needed_without_training(tmp_path):
    """summary (meta device), eval and train=false never read the ImageNet file."""
    from conftest import _compose

    check_config(_compose(("model=setr_naive", f"paths.weights_dir={tmp_path}"), "summary"))
    check_config(_train_cfg("experiment=ade20k_pup_b16", f"paths.weights_dir={tmp_path}", "train=false"))


@pytest.mark.slow
def test_missing_file_stops_src_train_before_anything_is_built(tmp_path):
    from pipeline import run_entry

    run_dir = tmp_path / "run"
    # data.root exists (its folder is checked before the weights; nothing in it is read before the weights stop)
    proc = run_entry("train.py", "experiment=ade20k_mla_deit_b16", f"paths.weights_dir={tmp_path / 'weights'}",
                     f"data.root={tmp_path}", "extras.print_config=false", f"hydra.run.dir={run_dir}",
                     log_dir=tmp_path, check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    file = tmp_path / "weights" / "deit_base_distilled_patch16_384-d0272ac0.pth"
    assert errors == [f"error: model.encoder.pretrained: weights file {file} not found; download "
                      f"{KNOWN_WEIGHTS[file.name].url} (timm deit_base_distilled_patch16_384: DeiT-B/16 distilled, "
                      "ImageNet-1k at 384 px); or set model.encoder.pretrained=none to train from scratch"], proc.stderr
    # nothing built: no trainer (Lightning's device lines), no dataset, no checkpoint
    assert "GPU available" not in proc.stderr + proc.stdout and not (run_dir / "checkpoints").exists()


def test_unexpected_keys_are_reported_not_fatal(tmp_path, caplog):
    """The *_mmseg heads build mmseg's ViT (no patch-embedding bias): the file's bias is left out, as mmseg's
    non-strict load does, and the summary line says so."""
    path = write("pth", source_vit(), tmp_path)
    enc = encoder(patch_bias=False)
    with caplog.at_level(logging.INFO, logger="setr"):
        assert enc.load_pretrained(path) == {"missing": [], "unexpected": ["patch_embed.proj.bias"]}
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("pretrained "))
    assert "51 tensors loaded" in line and line.endswith("missing: none; unexpected: patch_embed.proj.bias")
