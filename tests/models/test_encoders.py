"""The encoder table (setr.models.encoders): architecture facts read from timm, never copied; the blocks each head
family reads; the pretraining statistics that the data pipeline, the record and evaluation follow."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from conftest import _compose, write_tiny_checkpoint
from pipeline import last_json, run_entry
from setr.errors import SETRConfigError
from setr.models.encoders import (
    CLIP_MEAN_255,
    CLIP_STD_255,
    ENCODERS,
    arch_of,
    default_out_indices,
    out_indices_of,
    spec_of,
)
from setr.models.pretrained import where_to_get
from setr.values import IMAGENET_MEAN_255


@pytest.mark.parametrize("name, facts", [
    ("vit_large_patch16", (1024, 24, 16, 16, 1, 0, "abs", "vit")),
    ("deit_base_distilled_patch16", (768, 12, 12, 16, 2, 0, "abs", "vit")),
    ("vit_large_patch14_reg4_dinov2", (1024, 24, 16, 14, 5, 4, "abs", "vit")),
    ("vit_large_patch16_dinov3", (1024, 24, 16, 16, 5, 4, "rope", "eva")),
    ("eva02_large_patch14", (1024, 24, 16, 14, 1, 0, "rope", "eva")),
    ("deit3_large_patch16", (1024, 24, 16, 16, 1, 0, "abs", "vit")),
])
def test_architecture_facts_come_from_timm(name, facts):
    a = arch_of(name)
    assert (a.embed_dim, a.depth, a.num_heads, a.patch_size, a.num_prefix_tokens, a.num_reg_tokens, a.position,
            a.family) == facts
    small = arch_of(name, {"embed_dim": 64, "depth": 4, "num_heads": 2})  # overrides as model.encoder.arch
    assert (small.embed_dim, small.depth, small.patch_size) == (64, 4, facts[3])


def test_every_table_row_builds_with_timm_and_has_a_description():
    for name, spec in ENCODERS.items():
        a = arch_of(name)
        assert a.depth >= 4 and a.embed_dim % a.num_heads == 0, name
        assert spec.about and len(spec.mean) == len(spec.std) == 3, name
        for w in spec.weights:
            assert w.name and w.url and w.what, name


def test_head_family_blocks():
    assert out_indices_of("vit_large_patch16", "up") == [9, 14, 19, 23]
    assert out_indices_of("vit_large_patch16", "mla") == [5, 11, 17, 23]
    assert out_indices_of("vit_base_patch16", "up") == [3, 5, 7, 11]  # the released depth-12 configs' choice
    assert out_indices_of("vit_large_patch16_dinov3", "up") == [9, 14, 19, 23]  # the same layers at depth 24
    assert out_indices_of("vit_giant_patch14_dinov2", "mla") == [9, 19, 29, 39]  # scaled to depth 40
    assert default_out_indices(4, "up") == [0, 1, 2, 3]
    for depth in range(4, 49):
        for family in ("up", "mla"):
            blocks = default_out_indices(depth, family)
            assert len(blocks) == 4 and blocks == sorted(set(blocks)) and blocks[-1] == depth - 1, (depth, family)
    assert out_indices_of("vit_large_patch16", "up", depth=12) == default_out_indices(12, "up")
    with pytest.raises(SETRConfigError, match=r"model.encoder.out_indices: .* 3 blocks has too few"):
        default_out_indices(3, "up")


def test_unknown_encoder_is_one_line():
    with pytest.raises(SETRConfigError, match=r"model.encoder.name: unknown encoder 'vit_huge'; choose one of "):
        spec_of("vit_huge")


def test_missing_weights_name_the_release():
    hint = where_to_get(None, "vit_large_patch16_dinov3")
    assert "dinov3_vitl16_pretrain_lvd1689m-8aa4cbdd.pth" in hint and "dinov3" in hint
    from pathlib import Path

    assert "dl.fbaipublicfiles.com/dinov2/dinov2_vitl14/dinov2_vitl14_pretrain.pth" in where_to_get(
        Path("dinov2_vitl14_pretrain.pth"))


@pytest.mark.parametrize("encoder, mean, std", [
    ("vit_large_patch16", IMAGENET_MEAN_255, None),
    ("vit_large_patch14_dinov2", IMAGENET_MEAN_255, None),
    ("eva02_large_patch14", CLIP_MEAN_255, CLIP_STD_255),
])
def test_the_data_pipeline_follows_the_encoders_statistics(encoder, mean, std):
    cfg = _compose(("model/encoder=vit_test", f"model.encoder.name={encoder}"), "train")
    assert OmegaConf.to_container(cfg.data.mean, resolve=True) == list(mean)
    if std is not None:
        assert OmegaConf.to_container(cfg.data.std, resolve=True) == list(std)
    from setr.checkpoint import ModelRecord

    assert ModelRecord.from_config(cfg).mean == list(mean)  # what a checkpoint of this run carries


def test_the_weights_path_and_blocks_come_from_the_table(tmp_path):
    cfg = _compose(("model=setr_mla", "model/encoder=vit_base", f"paths.weights_dir={tmp_path}"), "train")
    enc = OmegaConf.to_container(cfg.model.encoder, resolve=True)
    assert enc["pretrained"] == f"{tmp_path}/jx_vit_base_p16_384-83fb41ba.pth" and enc["out_indices"] == [2, 5, 8, 11]
    cfg = _compose(("model=setr_pup", "model/encoder=vit_large", "model.encoder.name=vit_small_patch16"), "train")
    assert cfg.model.encoder.pretrained == "none"  # no released file: random initialisation
    cfg = _compose(("model=setr_pup", "model/encoder=vit_large", "+model.encoder.arch.depth=12"), "train")
    assert list(cfg.model.encoder.out_indices) == default_out_indices(12, "up")


@pytest.mark.slow
def test_eval_normalises_with_the_checkpoints_statistics(tmp_path):
    """A checkpoint trained with CLIP statistics (an EVA-02 encoder) is scored with them, whatever the data config
    says: evaluating under ImageNet's would give a silently wrong number."""
    ckpt = tmp_path / "m.ckpt"
    write_tiny_checkpoint(ckpt)
    stored = torch.load(ckpt, weights_only=True)
    stored["hyper_parameters"]["record"].update(mean=list(CLIP_MEAN_255), std=list(CLIP_STD_255))
    torch.save(stored, ckpt)
    proc = run_entry("eval.py", f"ckpt_path={ckpt}", "data.crop_size=64", "data.dataset.image_size=64",
                     "data.val_dataset.num_samples=4", "data.val_batch_size=4", "data.num_workers=0",
                     "data.num_classes=4", log_dir=tmp_path)
    assert f"eval normalisation: the checkpoint's mean {list(CLIP_MEAN_255)}" in proc.stdout + proc.stderr
    assert 0.0 <= last_json(proc)["val/mIoU"] <= 1.0
