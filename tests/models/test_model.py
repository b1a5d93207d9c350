"""The SETR model as plain modules: shapes, gradients, determinism, position embeddings, weights, bad configs and
the full-size parameter counts of the paper (built on the meta device: nothing is allocated)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import model_cfg, tiny_model_cfg
from mmseg_reference import mmseg_key, mmseg_reference
from setr.errors import SETRConfigError
from setr.models import build_setr
from setr.models.summary import build_meta_model, count_params

HEADS = ["naive", "pup", "mla", "naive_mmseg", "pup_mmseg", "mla_mmseg", "naive_mmseg_cityscapes"]
# auxiliary heads of each head preset: the same on the 4-block test encoder (conf/model/encoder/vit_test.yaml
# offers four blocks per family, as the ViT-L / ViT-B encoders do) as at full size
N_AUX = {"naive": 3, "pup": 4, "mla": 4, "naive_mmseg": 3, "pup_mmseg": 3, "mla_mmseg": 4,
         "naive_mmseg_cityscapes": 3}


def _tiny(head: str, crop: int = 64, num_classes: int = 5, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build_setr(tiny_model_cfg(head, crop, num_classes))


# ------------------------------------------------------------------------------------------------ shapes
@pytest.mark.parametrize("head", HEADS)
@pytest.mark.parametrize("size", [(64, 64), (48, 96), (50, 71)], ids=["square", "non-square", "not-multiple-of-16"])
def test_output_shapes(head, size):
    model = _tiny(head)
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        assert model.eval()(x).shape == (2, 5, *size)
        out = model.train()(x)
    assert out["out"].shape == (2, 5, *size)
    assert len(out["aux"]) == len(model.aux_weights) == N_AUX[head]
    assert all(a.shape == (2, 5, *size) for a in out["aux"])


def test_padding_does_not_leak_into_the_image_area():
    """Sizes that are not multiples of 16 are zero-padded at the bottom/right and cropped back: the logits of a
    50x71 input equal the top-left 50x71 logits of the same input padded to 64x80 by hand."""
    model = _tiny("pup").eval()
    x = torch.randn(1, 3, 50, 71)
    padded = torch.nn.functional.pad(x, (0, 80 - 71, 0, 64 - 50))
    with torch.no_grad():
        torch.testing.assert_close(model(x), model(padded)[..., :50, :71])


# --------------------------------------------------------------------------------------- gradients, eval
@pytest.mark.parametrize("head", HEADS)
def test_gradients_reach_every_trainable_parameter(head):
    model = _tiny(head).train()
    out = model(torch.randn(2, 3, 64, 64))
    loss = out["out"].square().mean() + sum(w * a.square().mean() for w, a in zip(model.aux_weights, out["aux"]))
    loss.backward()
    dead = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.any())]
    assert not dead
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    # SETR-MLA drops the class token before the first block: kept for checkpoints, frozen because it is dead
    assert frozen == (["encoder.vit.cls_token"] if head.startswith("mla") else [])


@pytest.mark.parametrize("head", ["naive", "mla"])
def test_eval_is_deterministic_and_batch_independent(head):
    model = _tiny(head).train()
    x = torch.randn(3, 3, 64, 80)
    with torch.no_grad():
        model(x)  # a training pass moves the BatchNorm statistics; eval must not
        model.eval()
        a, b = model(x), model(x)
        single = model(x[1:2])
    assert torch.equal(a, b)
    torch.testing.assert_close(single[0], a[1], atol=1e-5, rtol=1e-5)


def test_norm_layer_is_configurable():
    def norms(kind):
        return {type(m) for m in build_setr(tiny_model_cfg("pup", 64, 5, f"model.norm={kind}")).modules()
                if isinstance(m, (nn.BatchNorm2d, nn.SyncBatchNorm, nn.GroupNorm))}

    assert norms("bn") == {nn.BatchNorm2d}
    assert norms("syncbn") == {nn.SyncBatchNorm}
    assert norms("gn") == {nn.GroupNorm}


# ------------------------------------------------------------------------------ position embeddings, weights
def test_position_embeddings_resample_to_other_sizes():
    model = _tiny("naive", crop=64).eval()
    enc = model.encoder
    assert enc.grid_size == (4, 4)
    seen = []
    hook = enc.vit.pos_drop.register_forward_hook(lambda m, i, o: seen.append(o.shape[1]))
    with torch.no_grad():
        model(torch.randn(1, 3, 64, 64))
        model(torch.randn(1, 3, 96, 128))
    hook.remove()
    assert seen == [1 + 16, 1 + 6 * 8]  # class token + the token grid of each input


def _timm_weights(tmp_path, img_size: int, embed_dim: int = 64, name: str = "w.pth", prefix: str = ""):
    import timm

    torch.manual_seed(1)
    vit = timm.create_model("vit_tiny_patch16_384", pretrained=False, img_size=img_size, embed_dim=embed_dim,
                            depth=4, num_heads=2, num_classes=0)
    state = {prefix + k: v for k, v in vit.state_dict().items()}
    path = tmp_path / name
    torch.save(state, path)
    return path, vit.state_dict()


def test_load_pretrained_resamples_position_embeddings(tmp_path):
    from timm.layers import resample_abs_pos_embed

    path, ref = _timm_weights(tmp_path, img_size=32)  # a 2x2 grid; the model is built for 4x4
    model = _tiny("naive", crop=64)
    result = model.encoder.load_pretrained(path)
    assert result == {"missing": [], "unexpected": []}
    own = model.encoder.vit.state_dict()
    torch.testing.assert_close(own["blocks.2.mlp.fc1.weight"], ref["blocks.2.mlp.fc1.weight"])
    expected = resample_abs_pos_embed(ref["pos_embed"], new_size=(4, 4), old_size=(2, 2), num_prefix_tokens=1,
                                      interpolation="bilinear", antialias=False)
    torch.testing.assert_close(own["pos_embed"], expected)


def test_load_pretrained_through_the_config(tmp_path):
    path, ref = _timm_weights(tmp_path, img_size=64, prefix="module.")
    model = build_setr(tiny_model_cfg("naive", 64, 5, f"model.encoder.pretrained={path}"))
    torch.testing.assert_close(model.encoder.vit.state_dict()["pos_embed"], ref["pos_embed"])


def test_load_pretrained_errors_name_the_file(tmp_path):
    model = _tiny("naive")
    with pytest.raises(SETRConfigError, match=r"missing\.pth: pretrained weights file not found"):
        model.encoder.load_pretrained(tmp_path / "missing.pth")
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(SETRConfigError, match=r"garbage\.pth is not a readable weights file: it is not a torch file"):
        model.encoder.load_pretrained(garbage)
    wide, _ = _timm_weights(tmp_path, img_size=64, embed_dim=96, name="wide.pth")
    with pytest.raises(SETRConfigError, match=r"wide\.pth: weights do not fit encoder"):
        model.encoder.load_pretrained(wide)
    partial = tmp_path / "partial.pth"
    torch.save({"pos_embed": model.encoder.vit.pos_embed.detach().clone()}, partial)
    with pytest.raises(SETRConfigError, match=r"partial\.pth: checkpoint lacks"):
        model.encoder.load_pretrained(partial)


# ---------------------------------------------------------------------------------------------- bad configs
@pytest.mark.parametrize(
    "override, message",
    [
        ("model.encoder.name=vit_huge", "model.encoder.name: unknown encoder 'vit_huge'"),
        ("model.norm=ln", "model.norm: unknown norm layer 'ln'"),
        ("model.head.decode.in_index=7",
         "model.head.decode.in_index: position 7 is out of range for the 4 maps of model.encoder.out_indices"),
        ("model.head.auxiliary.in_index=[0,-5]",
         "model.head.auxiliary.in_index: position -5 is out of range for the 4 maps of model.encoder.out_indices"),
        ("model.encoder.out_indices=[0,9]",
         "model.encoder.out_indices: block 9 is out of range for encoder 'vit_tiny_patch16' with 4 blocks"),
        ("model.encoder.out_indices=[-5]",
         "model.encoder.out_indices: block -5 is out of range for encoder 'vit_tiny_patch16' with 4 blocks"),
        ("model.encoder.out_indices=[2,1,3]", "model.encoder.out_indices: blocks must be increasing"),
        ("model.encoder.out_indices=[]", "model.encoder.out_indices: at least one block"),
        ("model.head.decode.in_index=[0,1]", "model.head.decode.in_index: an 'up' head reads one map"),
        # the neck reads every out_indices map (as mmseg's MLANeck): block ids go to model.encoder.out_indices
        ("+model.head.neck.in_index=[0,1,2,3]", "model.head.neck: unknown key(s) ['in_index']"),
        ("model.head.auxiliary.type=fcn",
         "model.head.auxiliary.type: unknown head type 'fcn'; choose one of up, mla, linear"),
        ("+model.head.decode.dropout=0.1", "model.head.decode: unknown key(s) ['dropout']"),
        ("model.head.decode.type=fpn",
         "model.head.decode.type: unknown head type 'fpn'; choose one of up, mla, linear"),
        ("+model.encoder.arch.depth_mult=2", "model.encoder.arch: unknown key(s) ['depth_mult']"),
        ("model.head.auxiliary.loss_weight=-1", "model.head.auxiliary.loss_weight: must be >= 0"),
    ],
)
def test_bad_model_config_names_the_key(override, message):
    cfg = tiny_model_cfg("naive", 64, 5, override)
    with pytest.raises(SETRConfigError) as info:
        build_setr(cfg)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_bad_num_classes():
    cfg = tiny_model_cfg("naive", 64, 5)
    cfg["num_classes"] = 0
    with pytest.raises(SETRConfigError, match=r"model\.num_classes: expected a positive integer"):
        build_setr(cfg)


# ------------------------------------------------------------------------- assembly: out_indices, in_index
def _blocks(model, head) -> list[int] | int:
    """The encoder blocks (0-based) a head reads, through its in_index into the encoder's out_indices (heads on
    the MLA neck: the neck levels, i.e. all of out_indices)."""
    if model.neck is not None:
        return list(model.encoder.out_indices)
    pick = model.encoder.out_indices
    return [pick[i] for i in head.in_index] if isinstance(head.in_index, list) else pick[head.in_index]


# 0-based blocks read by (decode head, auxiliary heads): the official layers 24 / 10, 15, 20 (Naive), 24 /
# 10, 15, 20, 24 (PUP), 6, 12, 18, 24 (MLA, through the neck); mmseg's PUP has no auxiliary head on layer 24
FULL_SIZE_BLOCKS = {
    ("setr_naive", "naive"): ([9, 14, 19, 23], 23, [9, 14, 19]),
    ("setr_pup", "pup"): ([9, 14, 19, 23], 23, [9, 14, 19, 23]),
    ("setr_mla", "mla"): ([5, 11, 17, 23], [5, 11, 17, 23], [5, 11, 17, 23]),
    ("setr_naive", "naive_mmseg"): ([9, 14, 19, 23], 23, [9, 14, 19]),
    ("setr_pup", "pup_mmseg"): ([9, 14, 19, 23], 23, [9, 14, 19]),
    ("setr_mla", "mla_mmseg"): ([5, 11, 17, 23], [5, 11, 17, 23], [5, 11, 17, 23]),
    ("setr_naive", "naive_mmseg_cityscapes"): ([9, 14, 19, 23], 23, [9, 14, 19]),
}


@pytest.mark.parametrize("model, head", FULL_SIZE_BLOCKS)
def test_full_size_heads_read_the_official_blocks(model, head):
    out_indices, decode, aux = FULL_SIZE_BLOCKS[(model, head)]
    net = build_meta_model(model_cfg(f"model={model}", f"model/head={head}", "data=ade20k"))
    assert net.encoder.out_indices == out_indices
    assert _blocks(net, net.decode_head) == decode
    if net.neck is not None:  # MLA: the decode head reads every neck level, each auxiliary head one
        assert net.decode_head.in_index == [0, 1, 2, 3]
        assert [h.in_index for h in net.auxiliary_heads] == [0, 1, 2, 3]
    else:
        assert [_blocks(net, h) for h in net.auxiliary_heads] == aux


@pytest.mark.parametrize("model, out_indices", [("setr_naive", [3, 5, 7, 11]), ("setr_mla", [2, 5, 8, 11])])
def test_base_encoders_out_indices(model, out_indices):
    for encoder in ("vit_base", "deit_base"):
        net = build_meta_model(model_cfg(f"model={model}", f"model/encoder={encoder}", "data=ade20k"))
        assert net.encoder.out_indices == out_indices
        assert _blocks(net, net.decode_head) in (11, out_indices)


def test_small_default_model_keeps_its_blocks():
    """model=setr_small (the CPU default): PUP with three auxiliary heads on blocks 1, 3, 5 of its 6-block
    encoder and the decode head on block 5, as before out_indices existed (README count 3,386,384)."""
    net = build_meta_model(model_cfg("model=setr_small", "data=synthetic"))
    assert [_blocks(net, h) for h in net.auxiliary_heads] == [1, 3, 5] and _blocks(net, net.decode_head) == 5
    assert count_params(net)[0] == 3_386_384


@pytest.mark.parametrize("head", HEADS)
def test_heads_get_the_maps_their_in_index_names(head):
    """SETR routes every head the same way: ``feeds[in_index]`` (a list of maps for a list), where ``feeds`` is
    the encoder's ``out_indices`` maps or, with a neck, the neck's levels."""
    model = _tiny(head).train()
    seen = {}

    def spy(name):
        return lambda m, args, out: seen.__setitem__(name, args[0])

    handles = [model.decode_head.register_forward_hook(spy("decode"))]
    handles += [h.register_forward_hook(spy(f"aux{i}")) for i, h in enumerate(model.auxiliary_heads)]
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        model(x)
        feeds = model.encoder(x)
        if model.neck is not None:
            feeds = model.neck(feeds)
    for h in handles:
        h.remove()
    assert len(feeds) == 4

    def expected(index):
        return [feeds[i] for i in index] if isinstance(index, list) else feeds[index]

    for name, head_module in [("decode", model.decode_head)] + [(f"aux{i}", h) for i, h in
                                                                  enumerate(model.auxiliary_heads)]:
        want, got = expected(head_module.in_index), seen[name]
        if isinstance(want, list):
            assert len(got) == len(want) and all(torch.equal(a, b) for a, b in zip(got, want)), name
        else:
            assert torch.equal(got, want), name


def test_any_head_reads_any_feed_without_special_cases():
    """No head type is special-cased: the MLA decode head can read four encoder maps (no neck), a linear
    auxiliary head an encoder map, an up head a neck level."""
    no_neck = build_setr(tiny_model_cfg("mla", 64, 5, "model.head.neck=null")).eval()
    assert no_neck.neck is None and no_neck.decode_head.in_index == [0, 1, 2, 3]
    linear_aux = build_setr(tiny_model_cfg("naive", 64, 5, "model.head.auxiliary.type=linear",
                                           "model.head.auxiliary.in_index=[1]"))
    assert type(linear_aux.auxiliary_heads[0]).__name__ == "LinearAuxHead"
    up_aux_on_neck = build_setr(tiny_model_cfg("naive", 64, 5, "+model.head.neck.type=mla",
                                               "model.head.decode.in_index=3", "model.head.auxiliary.in_index=[0]"))
    for model in (no_neck, linear_aux.eval(), up_aux_on_neck.eval()):
        with torch.no_grad():
            assert model(torch.randn(1, 3, 64, 48)).shape == (1, 5, 64, 48)
        out = model.train()(torch.randn(2, 3, 64, 48))
        assert all(a.shape == (2, 5, 64, 48) for a in out["aux"])


def test_heads_and_necks_come_from_one_registry():
    from setr.models import heads as heads_mod
    from setr.models.registry import HEADS, NECKS

    assert HEADS.names() == ["up", "mla", "linear"] and NECKS.names() == ["mla"]
    with pytest.raises(SETRConfigError, match=r"^model.head.neck.type: unknown neck type 'fpn'; choose one of mla$"):
        build_setr(tiny_model_cfg("mla", 64, 5, "model.head.neck.type=fpn"))

    @HEADS.register("probe")
    class Probe(heads_mod.LinearAuxHead):
        """A new head type is one registration away from the config."""

    try:
        model = build_setr(tiny_model_cfg("naive", 64, 5, "model.head.auxiliary.type=probe",
                                          "model.head.auxiliary.in_index=[0,2]", "~model.head.auxiliary.channels",
                                          "~model.head.auxiliary.kernel_size", "~model.head.auxiliary.up_scales",
                                          "~model.head.auxiliary.conv_bias"))
        assert [type(h).__name__ for h in model.auxiliary_heads] == ["Probe", "Probe"]
        assert [h.in_index for h in model.auxiliary_heads] == [0, 2]
    finally:
        HEADS.unregister("probe")
    assert "probe" not in HEADS.names()


def test_small_model_with_the_mla_head_ignores_up_head_keys():
    """README: ``model/head=mla`` works with ``model=setr_small``, whose PUP widths do not apply to 1x1 heads."""
    cfg = model_cfg("model=setr_small", "model/head=mla", "model/encoder=vit_test", "data.crop_size=64")
    assert cfg["head"]["auxiliary"]["channels"] == 64
    model = build_setr(cfg)
    assert len(model.auxiliary_heads) == 4 and model.encoder.out_indices == [0, 1, 2, 3]


# ------------------------------------------------------------------------------------ legacy model configs
def _legacy(cfg: dict, taps: dict) -> dict:
    """``cfg`` as checkpoints saved before out_indices hold it: block ids in the heads' (and the neck's)
    in_index, the encoder's ``taps``, no ``out_indices``."""
    cfg = {**cfg, "encoder": dict(cfg["encoder"]), "head": {k: (dict(v) if isinstance(v, dict) else v)
                                                              for k, v in cfg["head"].items()}}
    blocks = cfg["encoder"].pop("out_indices")
    cfg["encoder"].pop("out_indices_presets")
    cfg["encoder"]["taps"] = taps
    head = cfg["head"]
    if head.get("neck"):
        head["neck"]["in_index"] = blocks
        del head["decode"]["in_index"]
    else:
        head["decode"]["in_index"] = blocks[head["decode"]["in_index"]]
        head["auxiliary"]["in_index"] = [blocks[i] for i in head["auxiliary"]["in_index"]]
    return cfg


TINY_TAPS = {"last": 3, "aux": [1, 2], "pup_aux": [1, 2, 3], "mla": [0, 1, 2, 3]}


# the tiny naive / pup models as the old taps built them: blocks 1, 2 (pup: 1, 2, 3) for the auxiliary heads, 3
OLD_TINY_UP = ["model.encoder.out_indices=[1,2,3]", "model.head.decode.in_index=2"]


@pytest.mark.parametrize("head, new_overrides", [
    ("naive", [*OLD_TINY_UP, "model.head.auxiliary.in_index=[0,1]"]),
    ("pup", [*OLD_TINY_UP, "model.head.auxiliary.in_index=[0,1,2]"]),
    ("mla", []),
])
def test_legacy_configs_in_checkpoints_build_the_same_model(head, new_overrides):
    """A checkpoint carries its model config; those written before out_indices (block ids as in_index) must
    build the very network they were trained as: same state-dict keys and shapes, same logits."""
    new_cfg = tiny_model_cfg(head, 64, 5, *new_overrides)
    legacy = _legacy(new_cfg, TINY_TAPS)
    assert "out_indices" not in legacy["encoder"]
    torch.manual_seed(0)
    old = build_setr(legacy).eval()
    torch.manual_seed(0)
    new = build_setr(new_cfg).eval()
    assert old.encoder.out_indices == new.encoder.out_indices
    assert {k: v.shape for k, v in old.state_dict().items()} == {k: v.shape for k, v in new.state_dict().items()}
    new.load_state_dict(old.state_dict())  # strict
    x = torch.randn(1, 3, 64, 80)
    with torch.no_grad():
        torch.testing.assert_close(old(x), new(x))
        old.train(), new.train()
        for a, b in zip(old(x)["aux"], new(x)["aux"]):
            torch.testing.assert_close(a, b)


@pytest.mark.parametrize("model, expected", [("setr_naive", 305_361_496), ("setr_pup", 317_922_542),
                                             ("setr_mla", 310_184_086)])
def test_legacy_full_size_configs_keep_their_structure(model, expected):
    taps = {"last": 23, "aux": [9, 14, 19], "pup_aux": [9, 14, 19, 23], "mla": [5, 11, 17, 23]}
    net = build_meta_model(_legacy(model_cfg(f"model={model}", "data=ade20k"), taps))
    assert count_params(net)[0] == expected
    new = build_meta_model(model_cfg(f"model={model}", "data=ade20k"))
    assert net.encoder.out_indices == new.encoder.out_indices
    assert [h.in_index for h in net.auxiliary_heads] == [h.in_index for h in new.auxiliary_heads]
    assert net.decode_head.in_index == new.decode_head.in_index


# -------------------------------------------------------------------------------------- full-size counts
# the official structure (github.com/fudan-zvg/SETR, configs/SETR/SETR_{Naive,PUP,MLA}_512x512_160k_ade20k_bs_16.py):
# ViT-L/16, 512x512, 150 classes, auxiliary heads as in those ADE20K configs
SPEC = {"setr_naive": 305_361_496, "setr_pup": 317_922_542, "setr_mla": 310_184_086}
# mmsegmentation 1.2.2's own SETR models (model/head=*_mmseg; its configs/_base_/models/setr_*.py and
# mmseg/models/decode_heads/setr_*.py, necks/mla_neck.py, backbones/vit.py): no patch-embedding bias, no conv
# bias in the up heads, 2-stage auxiliary heads (ADE20K Naive, PUP), 3 PUP auxiliary heads, biased MLA aux
# classifiers. ADE20K 512x512, 150 classes; Cityscapes 768x768, 19 classes (its Naive aux heads have one stage).
MMSEG = {
    ("naive_mmseg", "ade20k"): 305_557_592,
    ("pup_mmseg", "ade20k"): 317_290_072,
    ("mla_mmseg", "ade20k"): 309_569_262,
    ("naive_mmseg_cityscapes", "cityscapes"): 306_535_500,
}


@pytest.mark.parametrize("model, expected", SPEC.items())
def test_full_size_counts_match_the_spec(model, expected):
    net = build_meta_model(model_cfg(f"model={model}", "data=ade20k"))
    total, _ = count_params(net)
    assert abs(total - expected) / expected < 1e-3
    assert total == expected  # exact, in fact
    assert net.encoder.depth == 24 and net.encoder.embed_dim == 1024


@pytest.mark.parametrize("head, data", MMSEG)
def test_full_size_counts_of_the_mmseg_variants(head, data):
    net = build_meta_model(model_cfg(f"model=setr_{head.split('_')[0]}", f"model/head={head}", f"data={data}"))
    assert count_params(net)[0] == MMSEG[(head, data)]
    assert net.encoder.vit.patch_embed.proj.bias is None


@pytest.mark.parametrize(
    "encoder, depth, dim, prefix",
    [("vit_base", 12, 768, 1), ("deit_base", 12, 768, 2), ("vit_tiny", 6, 192, 1), ("vit_large", 24, 1024, 1)],
)
def test_encoders_by_name(encoder, depth, dim, prefix):
    net = build_meta_model(model_cfg("model=setr_naive", f"model/encoder={encoder}", "data=ade20k"))
    assert (net.encoder.depth, net.encoder.embed_dim, net.encoder.num_prefix_tokens) == (depth, dim, prefix)
    assert isinstance(net.encoder.vit, __import__("timm").models.vision_transformer.VisionTransformer)


def test_deit_encoder_with_distillation_token_runs():
    """DeiT has two prefix tokens (class + distillation): the maps must come from the patch tokens only."""
    cfg = model_cfg("model=setr_naive", "model/encoder=deit_base", "model.encoder.pretrained=none", "data=synthetic",
                    "data.crop_size=64",
                    "+model.encoder.arch.embed_dim=64", "+model.encoder.arch.depth=2",
                    "+model.encoder.arch.num_heads=2", "model.encoder.out_indices=[0,1]",
                    "model.head.decode.in_index=1", "model.head.auxiliary.in_index=[0]")
    torch.manual_seed(0)
    model = build_setr(cfg).eval()
    assert model.encoder.num_prefix_tokens == 2
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 96)).shape == (1, cfg["num_classes"], 64, 96)


# ------------------------------------------------------------------- mmsegmentation structure (model/head=*_mmseg)
MMSEG_HEADS = ["naive_mmseg", "pup_mmseg", "mla_mmseg", "naive_mmseg_cityscapes"]


@pytest.mark.parametrize("head", HEADS)
def test_patch_embedding_bias_only_in_the_official_structure(head):
    """mmsegmentation's ViT has no bias in its patch-embedding conv; timm's and the official SETR's have one."""
    model = _tiny(head)
    mmseg = "_mmseg" in head
    assert (model.encoder.vit.patch_embed.proj.bias is None) == mmseg
    assert ("encoder.vit.patch_embed.proj.bias" in model.state_dict()) != mmseg


@pytest.mark.parametrize("head, stages", [("naive_mmseg", [4, 4]), ("pup_mmseg", [4, 4]),
                                          ("naive_mmseg_cityscapes", [4])])
def test_mmseg_auxiliary_heads_have_the_configs_stages(head, stages):
    """ADE20K Naive and PUP (both datasets) auxiliary heads: num_convs=2, each stage followed by a 4x up;
    Cityscapes Naive: num_convs=1."""
    model = _tiny(head)
    for aux in model.auxiliary_heads:
        assert aux.up_scales == stages and len(aux.stages) == len(stages)
        assert all(s[0].bias is None for s in aux.stages)
    assert all(s[0].bias is None for s in model.decode_head.stages)


def test_mmseg_neck_emits_the_deepest_level_first():
    """mmseg's MLAModule reverses the list before the top-down sum and zips the sums with ``feat_extract``: output 0
    is ``feat_extract.0`` (our ``fuse.0``) on the deepest level's projection alone, output 3 ``fuse.3`` on the
    sum of all four. The official order is the reverse (output 0 = the shallowest level's sum)."""
    from setr.models.heads import MLANeck

    torch.manual_seed(0)
    neck = MLANeck(in_channels=8, channels=4, num_levels=4, deepest_first=True).eval()
    official = MLANeck(in_channels=8, channels=4, num_levels=4).eval()
    official.load_state_dict(neck.state_dict())  # same keys: only the order of the outputs differs
    feats = [torch.randn(2, 8, 3, 5) for _ in range(4)]
    with torch.no_grad():
        proj = [p(n(f)) for f, n, p in zip(feats, neck.norms, neck.proj)]
        out = neck(feats)
        torch.testing.assert_close(out[0], neck.fuse[0](proj[3]))
        torch.testing.assert_close(out[1], neck.fuse[1](proj[3] + proj[2]))
        torch.testing.assert_close(out[3], neck.fuse[3](proj[3] + proj[2] + proj[1] + proj[0]))
        # output 0 depends on the deepest input only
        changed = neck([torch.randn_like(f) for f in feats[:3]] + [feats[3]])
        torch.testing.assert_close(changed[0], out[0])
        assert not torch.allclose(changed[1], out[1])
        off = official(feats)
        torch.testing.assert_close(off[0], official.fuse[0](proj[3] + proj[2] + proj[1] + proj[0]))
        torch.testing.assert_close(off[3], official.fuse[3](proj[3]))
    model = _tiny("mla_mmseg")
    assert model.neck.deepest_first and not _tiny("mla").neck.deepest_first


@pytest.mark.parametrize("head", MMSEG_HEADS)
def test_mmseg_heads_compute_mmsegs_forward_under_the_key_map(head):
    """Our *_mmseg heads (and neck) loaded into a transcription of mmseg's modules through MMSEG_KEY_RULES (strict,
    every key and shape matching) give the same logits: module order, upsampling, align_corners, classifier
    position, neck output order and the auxiliary heads' inputs."""
    model = _tiny(head, num_classes=7)
    with torch.no_grad():  # BatchNorm statistics that are not the identity
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)
                m.weight.normal_()
                m.bias.normal_()
    model.eval()
    ours = {k: v for k, v in model.state_dict().items() if not k.startswith("encoder.")}
    ref = mmseg_reference(head, model.encoder.embed_dim, 7).eval()
    ref.load_state_dict({mmseg_key(k): v for k, v in ours.items()})  # strict: the map is complete and 1:1
    x = torch.randn(2, 3, 64, 48)
    with torch.no_grad():
        feats = model.encoder(x)
        feeds = ref.neck(feats) if head == "mla_mmseg" else feats
        ref_logits = ref.decode_head(feeds if head == "mla_mmseg" else feeds[3])
        ref_aux = [h(feeds[i]) for i, h in enumerate(ref.auxiliary_head)]
        expected = nn.functional.interpolate(ref_logits, size=(64, 48), mode="bilinear", align_corners=False)
        torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-5)
        ours_feeds = model.neck(feats) if model.neck is not None else feats
        for i, (h, want) in enumerate(zip(model.auxiliary_heads, ref_aux)):
            assert h.in_index == i
            torch.testing.assert_close(h(ours_feeds[h.in_index]), want, atol=1e-5, rtol=1e-5)
