"""Pretrained weights of every encoder family of the table (DINOv2 with and without registers, DINOv3, EVA-02,
DeiT-III) load from local files in each layout they are released in: timm's state dict (``.pth``), a timm /
Hugging Face hub folder holding ``model.safetensors``, and the original release's own key names. Each file is
written here from a tiny random model that timm itself builds; the encoder loaded from it must compute exactly what
that timm model computes (``forward_intermediates``, no final norm). The release layouts are produced by inverting
what timm's checkpoint filters map (the lines inverted are cited at each writer), so a filter that changes its
mapping, or a loader that stops applying it, fails here. A file of another family / width, a folder without
``model.safetensors`` and a file that holds no tensors stop with one line naming the file. Nothing is downloaded."""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass

import pytest
import timm
import torch
from safetensors.torch import save_file
from timm.models.vision_transformer import checkpoint_filter_fn

from setr.errors import SETRConfigError
from setr.models.encoder import ViTEncoder
from setr.models.pretrained import Weights, check_pretrained_file, read_weights, to_model_layout

ARCH = {"embed_dim": 64, "depth": 2, "num_heads": 2}
BLOCKS = [0, 1]
VIT_FILTER = "timm.models.vision_transformer.checkpoint_filter_fn"
EVA_FILTER = "timm.models.eva.checkpoint_filter_fn"


@dataclass(frozen=True)
class Family:
    timm_name: str  # what timm builds (the table's timm model)
    encoder: str  # model.encoder.name
    size: int  # the tiny model's image size: a 4x4 grid
    release: str  # the original release's file name
    layout: str  # what the summary line calls the release layout
    release_dropped: str  # what the summary line lists as dropped for the release file


FAMILIES = {
    "dinov2_reg4": Family("vit_large_patch14_reg4_dinov2", "vit_large_patch14_reg4_dinov2", 56,
                          "dinov2_vitl14_reg4_pretrain.pth",
                          f"DINOv2 release layout (registers), mapped by {VIT_FILTER}",
                          "mask_token, norm.bias, norm.weight"),
    "dinov2": Family("vit_large_patch14_dinov2", "vit_large_patch14_dinov2", 56, "dinov2_vitl14_pretrain.pth",
                     f"DINOv2 release layout, mapped by {VIT_FILTER}", "mask_token, norm.bias, norm.weight"),
    "dinov3": Family("vit_large_patch16_dinov3", "vit_large_patch16_dinov3", 64,
                     "dinov3_vitl16_pretrain_lvd1689m-{sha}.pth", f"DINOv3 release layout, mapped by {EVA_FILTER}",
                     # the zero qkv.bias timm's ViT-L/16 has no place for (qkv_bias=False), with its mask
                     "blocks.0.attn.qkv.bias, blocks.0.attn.qkv.bias_mask, blocks.1.attn.qkv.bias, "
                     "blocks.1.attn.qkv.bias_mask, mask_token, norm.bias, norm.weight, rope_embed.periods"),
    "eva02": Family("eva02_large_patch14_448", "eva02_large_patch14", 56, "eva02_L_pt_m38m_p14.pt",
                    f"EVA-02 release layout, mapped by {EVA_FILTER}",
                    "lm_head.bias, lm_head.weight, mask_token, norm.bias, norm.weight, rope.freqs_cos, rope.freqs_sin"),
    "deit3": Family("deit3_large_patch16_384", "deit3_large_patch16", 64, "deit_3_large_384_21k.pth",
                    f"DeiT-III release layout, mapped by {VIT_FILTER}",
                    "head.bias, head.weight, norm.bias, norm.weight"),
}
# what timm's own state dict holds beyond the encoder (the final norm; EVA-02: fc_norm)
TIMM_DROPPED = {"eva02": "fc_norm.bias, fc_norm.weight"}


# ------------------------------------------------------------------------------------------------ helpers
def source_model(fam: Family, seed: int = 1, **arch) -> torch.nn.Module:
    """A tiny timm model of the family with random weights that all matter (timm zero-initialises biases and
    starts layer scale at 1e-5). The class token is put on a 1/256 grid so that DINOv2's folding of the class
    token's position embedding into it (and back) is exact in float32."""
    torch.manual_seed(seed)
    vit = timm.create_model(fam.timm_name, pretrained=False, img_size=fam.size, num_classes=0, **{**ARCH, **arch})
    with torch.no_grad():
        for p in vit.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        vit.cls_token.copy_(torch.round(vit.cls_token * 256) / 256)
    return vit.eval()


def timm_state(vit: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone().contiguous() for k, v in vit.state_dict().items()}


def release_state(name: str, vit: torch.nn.Module) -> dict:
    """The original release's layout of ``vit``: timm's checkpoint filter run backwards."""
    sd = timm_state(vit)
    c = vit.embed_dim
    if name in ("dinov2", "dinov2_reg4"):
        # timm/models/vision_transformer.py, _convert_dinov2:
        #   state_dict.pop("mask_token", None)
        #   if 'register_tokens' in state_dict:
        #       out_dict['reg_token'] = state_dict.pop('register_tokens')
        #       out_dict['cls_token'] = state_dict.pop('cls_token') + state_dict['pos_embed'][:, 0]
        #       out_dict['pos_embed'] = state_dict.pop('pos_embed')[:, 1:]
        # (ls1.gamma / ls2.gamma / mlp.fc1 / fc2 have DINOv2's own names in timm; the final norm is kept)
        sd["mask_token"] = torch.randn(1, c)
        if name == "dinov2_reg4":
            pos0 = torch.randint(-64, 64, (1, 1, c)) / 256.0  # on the class token's 1/256 grid: exact sums
            sd["register_tokens"] = sd.pop("reg_token")
            sd["cls_token"] = sd["cls_token"] - pos0
            sd["pos_embed"] = torch.cat([pos0, sd["pos_embed"]], dim=1)
        return sd  # a plain state dict, as dl.fbaipublicfiles.com/dinov2/*_pretrain.pth
    if name == "dinov3":
        # timm/models/eva.py, checkpoint_filter_fn, the dinov3_weights branch:
        #   if any([k.endswith(f) for f in ['.periods', '.bias_mask', 'mask_token']]): continue
        #   if k.endswith('qkv.bias'): ... model.get_parameter(q_bias_k) ... except: continue   (timm's L/16 has
        #       qkv_bias=False: the release's all-zero qkv.bias is skipped)
        #   k = k.replace('ls1.gamma', 'gamma_1'); k = k.replace('ls2.gamma', 'gamma_2')
        #   k = k.replace('storage_tokens', 'reg_token')
        # and `if 'rope' in k and not k == 'rope.freqs': continue` (the RoPE periods buffer)
        out = {}
        for k, v in sd.items():
            k = k.replace("gamma_1", "ls1.gamma").replace("gamma_2", "ls2.gamma").replace("reg_token", "storage_tokens")
            out[k] = v
        for i in range(len(vit.blocks)):
            out[f"blocks.{i}.attn.qkv.bias"] = torch.zeros(3 * c)
            out[f"blocks.{i}.attn.qkv.bias_mask"] = torch.cat([torch.ones(c), torch.zeros(c), torch.ones(c)])
        out["mask_token"] = torch.randn(1, c)
        out["rope_embed.periods"] = torch.rand(c // ARCH["num_heads"] // 4)
        return out
    if name == "eva02":
        # timm/models/eva.py, checkpoint_filter_fn (EVA-02 MIM checkpoints: mim_weights, no_qkv):
        #   elif mim_weights and k in ('mask_token', 'lm_head.weight', 'lm_head.bias', 'norm.weight', 'norm.bias'):
        #       norm -> fc_norm; mask_token / lm_head skipped
        #   if 'rope' in k and not k == 'rope.freqs': continue
        #   k.replace('mlp.ffn_ln', 'mlp.norm'); ('mlp.w1', 'mlp.fc1_g'); ('mlp.w2', 'mlp.fc1_x'); ('mlp.w3', 'mlp.fc2')
        #   if no_qkv: k.replace('q_bias', 'q_proj.bias'); k.replace('v_bias', 'v_proj.bias')
        swaps = [("mlp.fc1_g", "mlp.w1"), ("mlp.fc1_x", "mlp.w2"), ("mlp.fc2", "mlp.w3"), ("mlp.norm", "mlp.ffn_ln"),
                 ("attn.q_proj.bias", "attn.q_bias"), ("attn.v_proj.bias", "attn.v_bias"), ("fc_norm.", "norm.")]
        out = {}
        for k, v in sd.items():
            for a, b in swaps:
                k = k.replace(a, b)
            out[k] = v
        n = (FAMILIES[name].size // 14) ** 2
        out.update({"mask_token": torch.randn(1, 1, c), "lm_head.weight": torch.randn(8, c), "lm_head.bias":
                    torch.randn(8), "rope.freqs_cos": torch.randn(n, c // 2), "rope.freqs_sin": torch.randn(n, c // 2)})
        return {"module": out}  # the filter unwraps model_ema / model / module
    if name == "deit3":
        # timm/models/vision_transformer.py, checkpoint_filter_fn(adapt_layer_scale=True) (timm's deit3 models):
        #   elif adapt_layer_scale and 'gamma_' in k: k = re.sub(r'gamma_([0-9])', r'ls\1.gamma', k)
        out = {k.replace("ls1.gamma", "gamma_1").replace("ls2.gamma", "gamma_2"): v for k, v in sd.items()}
        out["head.weight"], out["head.bias"] = torch.randn(10, c), torch.randn(10)
        return {"model": out}  # as DeiT's main.py saves its checkpoints
    raise KeyError(name)


def write(layout: str, name: str, vit: torch.nn.Module, tmp_path):
    """Write ``vit`` in ``layout``; returns (what model.encoder.pretrained names, the file the log line names)."""
    fam = FAMILIES[name]
    if layout == "timm":
        path = tmp_path / f"{fam.timm_name}.pth"
        torch.save(timm_state(vit), path)
        return path, path
    if layout == "hub":  # a snapshot of huggingface.co/timm/<model>: config.json beside model.safetensors
        folder = tmp_path / f"timm--{fam.timm_name}"
        folder.mkdir()
        save_file(timm_state(vit), str(folder / "model.safetensors"))
        (folder / "config.json").write_text(json.dumps({"architecture": fam.timm_name, "num_classes": 0}))
        return folder, folder / "model.safetensors"
    path = tmp_path / fam.release.replace("-{sha}", "")
    torch.save(release_state(name, vit), path)
    if "{sha}" in fam.release:  # the release's torch-hub hash suffix, checked on load
        sha = hashlib.sha256(path.read_bytes()).hexdigest()[:8]
        path = path.rename(tmp_path / fam.release.format(sha=sha))
    return path, path


def reference(vit: torch.nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """What the timm model computes: the blocks' outputs as NCHW maps, no final norm."""
    with torch.no_grad():
        return vit.forward_intermediates(x, indices=BLOCKS, norm=False, output_fmt="NCHW", intermediates_only=True)


def summary_line(caplog) -> str:
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("pretrained ")]
    assert len(lines) == 1, lines
    return lines[0]


def one_line_error(call) -> str:
    with pytest.raises(SETRConfigError) as e:
        call()
    msg = str(e.value)
    assert "\n" not in msg, msg
    return msg


# ------------------------------------------------------------------------------------------------- layouts
# timm's releases: its state dict (.pth) and a hub snapshot folder (model.safetensors); the family's own release
LAYOUTS = {"timm": ("timm", "hub"), "release": ("release",)}


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("name", list(FAMILIES))
def test_every_family_loads_each_layout_and_computes_what_timm_computes(tmp_path, caplog, name, layout):
    fam = FAMILIES[name]
    src = source_model(fam)
    x = torch.randn(2, 3, fam.size, fam.size, generator=torch.Generator().manual_seed(0))
    expected = reference(src, x)
    for kind in LAYOUTS[layout]:
        caplog.clear()
        given, file = write(kind, name, src, tmp_path)
        with caplog.at_level(logging.INFO, logger="setr"):
            enc = ViTEncoder(fam.encoder, img_size=fam.size, arch=ARCH, out_indices=BLOCKS,
                             pretrained=str(given)).eval()
        with torch.no_grad():
            got = enc(x)
        for g, r in zip(got, expected, strict=True):
            assert torch.equal(g, r), (kind, (g - r).abs().max())

        line = summary_line(caplog)
        fmt = {"timm": "pth, timm layout", "hub": "safetensors, timm layout"}.get(kind,
                                                                                f"{file.suffix[1:]}, {fam.layout}")
        own = len(enc.vit.state_dict())
        assert line.startswith(f"pretrained {file}: {fmt}, {own} tensors loaded, "), line
        pos = "no pos_embed" if name == "dinov3" else "pos_embed 4x4 (kept)"
        dropped = fam.release_dropped if kind == "release" else TIMM_DROPPED.get(name, "norm.bias, norm.weight")
        assert line.endswith(f", {pos}, dropped: {dropped}; missing: none; unexpected: none"), line


@pytest.mark.parametrize("name", ["dinov2_reg4", "eva02", "deit3"])
def test_release_position_embeddings_resample_bilinearly_to_the_crop(tmp_path, caplog, name):
    """At another crop the release's position embeddings are resampled as SETR resamples them (bilinear, no
    antialias: the encoder's pos_embed_interp), not by the filter's bicubic default: the encoder then computes what
    timm's model of that size computes when timm's filter loads the timm state with bilinear resampling."""
    fam = FAMILIES[name]
    src = source_model(fam)
    path, _ = write("release", name, src, tmp_path)
    crop = fam.size // 4 * 6  # a 6x6 grid
    with caplog.at_level(logging.INFO, logger="setr"):
        enc = ViTEncoder(fam.encoder, img_size=crop, arch=ARCH, out_indices=BLOCKS, pretrained=str(path)).eval()
    assert "pos_embed 4x4 -> 6x6" in summary_line(caplog)
    ref = timm.create_model(fam.timm_name, pretrained=False, img_size=crop, num_classes=0, **ARCH).eval()
    if name == "eva02":
        from timm.models.eva import checkpoint_filter_fn as eva_filter

        state = eva_filter(timm_state(src), ref, interpolation="bilinear", antialias=False)
    else:
        state = checkpoint_filter_fn(timm_state(src), ref, interpolation="bilinear", antialias=False)
    ref.load_state_dict(state)
    x = torch.randn(1, 3, crop, crop, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = enc(x)
    for g, r in zip(got, reference(ref, x), strict=True):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5)


# -------------------------------------------------------------------------------------------------- errors
def test_weights_of_another_family_or_width_stop_with_one_line(tmp_path):
    dinov2 = FAMILIES["dinov2"]
    path, _ = write("release", "dinov2", source_model(dinov2), tmp_path)
    hint = f"; {path.name} is the released file of vit_large_patch14_dinov2: set model.encoder.name=" \
           "vit_large_patch14_dinov2"
    # another family, same patch and width: EVA-02's attention / SwiGLU weights are not in the file
    msg = one_line_error(lambda: ViTEncoder("eva02_large_patch14", img_size=56, arch=ARCH, pretrained=str(path)))
    assert msg.startswith(f"{path}: checkpoint lacks ") and "(pth, DINOv2 release layout, mapped by " in msg
    assert msg.endswith(hint)
    # another patch size: never silently resampled (timm's filter would)
    msg = one_line_error(lambda: ViTEncoder("vit_large_patch16_dinov3", img_size=64, arch=ARCH, pretrained=str(path)))
    assert msg == f"{path}: patch embedding 14x14 vs patch size 16 of encoder 'vit_large_patch16_dinov3': weights " \
                  f"of another encoder{hint}"
    # registers or not: the position table of DINOv2 without registers has the class token's slot
    msg = one_line_error(lambda: ViTEncoder("vit_large_patch14_reg4_dinov2", img_size=56, arch=ARCH,
                                            pretrained=str(path)))
    assert msg.startswith(f"{path}: pos_embed (1, 17, 64) has 17 patch positions after 0 prefix token(s)")
    assert msg.endswith(hint)
    # DINOv3's release has a qkv.bias in every block; timm's ViT-L/16 has none (the released one is zero)
    dinov3 = FAMILIES["dinov3"]
    src3 = source_model(dinov3)
    state = release_state("dinov3", src3)
    state["blocks.1.attn.qkv.bias"][0] = 0.5
    biased = tmp_path / "dinov3_vitl16_biased.pth"
    torch.save(state, biased)
    msg = one_line_error(lambda: ViTEncoder(dinov3.encoder, img_size=64, arch=ARCH, pretrained=str(biased)))
    assert msg == (f"{biased}: blocks.1.attn.qkv.bias is not zero but the encoder's attention has no bias "
                   "(non-zero in 1 block(s)): weights of another variant of the encoder")
    # another width
    msg = one_line_error(lambda: ViTEncoder("vit_large_patch14_dinov2", img_size=56, pretrained=str(path),
                                            arch={**ARCH, "embed_dim": 32}))
    assert msg.startswith(f"{path}: weights do not fit encoder 'vit_large_patch14_dinov2': cls_token: file (1, 1, 64) "
                          "vs model (1, 1, 32)")


def test_folders_and_files_without_weights_stop_with_one_line(tmp_path):
    fam = FAMILIES["dinov3"]
    folder = tmp_path / "snapshot"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "pytorch_model.bin").write_bytes(b"")

    def build(value):
        return lambda: ViTEncoder(fam.encoder, img_size=fam.size, arch=ARCH, pretrained=str(value))

    expected = (f"model.encoder.pretrained: {folder} is a folder without model.safetensors (the timm / Hugging Face "
                "hub layout; it holds config.json, pytorch_model.bin): name the weights file itself")
    assert one_line_error(build(folder)) == expected
    assert one_line_error(lambda: check_pretrained_file(str(folder))) == expected

    (folder / "model.safetensors").write_text("<html>rate limited</html>")  # a failed download
    msg = one_line_error(build(folder))
    assert msg.startswith(f"model.encoder.pretrained: cannot read safetensors file {folder / 'model.safetensors'} (")

    good, file = write("hub", "dinov3", source_model(fam), tmp_path)
    assert check_pretrained_file(str(good)) == file

    transformers = tmp_path / "facebook--dinov2-large"  # transformers' own names, not timm's
    transformers.mkdir()
    save_file({"embeddings.cls_token": torch.zeros(1, 1, 64), "encoder.layer.0.norm1.weight": torch.ones(64)},
              str(transformers / "model.safetensors"))
    assert one_line_error(build(transformers)) == (
        f"model.encoder.pretrained: {transformers / 'model.safetensors'} is a Hugging Face transformers checkpoint "
        "(embeddings.*, encoder.layer.*), which timm does not read: use timm's file (a snapshot of "
        "huggingface.co/timm/<model>) or the original release")

    no_tensors = tmp_path / "eva02_L_pt_m38m_p14.pt"
    torch.save({"module": {"epoch": 3, "args": [1, 2]}}, no_tensors)
    assert one_line_error(build(no_tensors)) == f"model.encoder.pretrained: {no_tensors} is not a state dict of tensors"


def test_timm_filter_leaves_timm_layouts_untouched(tmp_path):
    """The classic SETR path stays bit-identical: on a timm state dict (SETR's jx ViT-L file is one; the .npz and
    mmseg readers produce one too) the filter step hands back the very same tensors, for either filter."""
    torch.manual_seed(0)
    vit = timm.create_model("vit_large_patch16_384", pretrained=False, img_size=64, num_classes=0, **ARCH)
    enc = ViTEncoder("vit_large_patch16", img_size=64, arch=ARCH)
    path = tmp_path / "jx_like.pth"
    torch.save(timm_state(vit), path)
    weights = read_weights(path)
    assert weights.layout == "timm layout"
    assert to_model_layout(weights, enc.vit) is weights
    dinov3 = Weights(timm_state(source_model(FAMILIES["dinov3"])), "safetensors", [])
    enc3 = ViTEncoder("vit_large_patch16_dinov3", img_size=64, arch=ARCH)
    assert to_model_layout(dinov3, enc3.vit) is dinov3
