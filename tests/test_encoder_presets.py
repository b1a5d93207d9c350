"""The encoder presets (conf/model/encoder/*.yaml) and the experiment presets on today's plain ViTs (DINOv2, DINOv3,
EVA-02): every preset names an encoder of the table, every released encoder composes, and the 18 presets compose to
the recipe their header states (AdamW, layer decay from the table, poly + warm-up, no published number)."""

from __future__ import annotations

import shutil

import pytest
import yaml
from omegaconf import OmegaConf

from setr.models.encoders import CLIP_MEAN_255, CLIP_STD_255, ENCODERS, arch_of, default_weights, spec_of
from setr.paths import CONF_DIR
from setr.values import IMAGENET_MEAN_255, IMAGENET_STD_255

ENCODER_DIR = CONF_DIR / "model" / "encoder"

# the experiment presets on today's encoders: <data>_<head>_<short>.yaml -> (encoder preset, table name)
MODERN = {"dinov2_l": ("dinov2_large", "vit_large_patch14_dinov2"),
          "dinov3_l": ("dinov3_large", "vit_large_patch16_dinov3"),
          "eva02_l": ("eva02_large", "eva02_large_patch14")}
DATA = {"ade20k": (512, 2, 160_000), "cityscapes": (768, 1, 80_000)}  # crop, batch per device (x 8 GPUs), steps
HEADS = ("naive", "pup", "mla")
PRESETS = {f"{d}_{h}_{s}": (d, h, s) for d in DATA for h in HEADS for s in MODERN}


def _compose(*overrides: str, config: str = "train"):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config, overrides=list(overrides))


def preset_encoders(folder) -> dict[str, str]:
    """``{preset: model.encoder.name}`` of every yaml in an encoder-preset folder, following ``defaults`` to the
    preset a file inherits its name from (as Hydra composes them)."""
    docs = {p.stem: yaml.safe_load(p.read_text()) or {} for p in sorted(folder.glob("*.yaml"))}

    def name_of(stem: str, seen: tuple[str, ...] = ()) -> str:
        if stem in seen:
            raise ValueError(f"{folder}/{stem}.yaml: defaults loop {' -> '.join((*seen, stem))}")
        doc = docs[stem]
        if "name" in doc:
            return doc["name"]
        parents = [d for d in doc.get("defaults", []) if isinstance(d, str) and d != "_self_"]
        if not parents:
            raise ValueError(f"{folder}/{stem}.yaml: no encoder name and no preset to inherit one from")
        return name_of(parents[-1], (*seen, stem))

    return {stem: name_of(stem) for stem in docs}


def unknown_encoders(folder) -> dict[str, str]:
    """The presets of ``folder`` naming an encoder the table does not have."""
    return {stem: name for stem, name in preset_encoders(folder).items() if name not in ENCODERS}


# ------------------------------------------------------------------------------------------- encoder presets
def test_every_encoder_preset_names_an_encoder_of_the_table():
    names = preset_encoders(ENCODER_DIR)
    assert unknown_encoders(ENCODER_DIR) == {}
    # today's encoders have their presets
    for stem, name in {"dinov2_large": "vit_large_patch14_dinov2", "dinov2_large_reg4": "vit_large_patch14_reg4_dinov2",
                       "dinov3_large": "vit_large_patch16_dinov3", "eva02_large": "eva02_large_patch14",
                       "deit3_large": "deit3_large_patch16", "deit3_base": "deit3_base_patch16"}.items():
        assert names[stem] == name


def test_a_preset_naming_an_unknown_encoder_is_caught(tmp_path):
    """The check above reads names the way Hydra composes them: a preset with its own unknown name is caught, one
    inheriting a known name is not."""
    shutil.copy(ENCODER_DIR / "vit_large.yaml", tmp_path)
    (tmp_path / "inherits.yaml").write_text("defaults:\n  - vit_large\n  - _self_\npos_embed_interp: bicubic\n")
    (tmp_path / "typo.yaml").write_text("defaults:\n  - vit_large\n  - _self_\nname: vit_large_patch14_dinov3\n")
    assert preset_encoders(tmp_path)["inherits"] == "vit_large_patch16"
    assert unknown_encoders(tmp_path) == {"typo": "vit_large_patch14_dinov3"}


def test_preset_names_agree_with_hydra():
    """The yaml reading of test 1 is what Hydra composes (model/encoder=<preset> -> model.encoder.name)."""
    for stem, name in preset_encoders(ENCODER_DIR).items():
        assert _compose(f"model/encoder={stem}", config="summary").model.encoder.name == name, stem


@pytest.mark.parametrize("name", [n for n, s in ENCODERS.items() if s.weights])
def test_every_released_encoder_composes(name):
    """Each table encoder with released weights composes, through its preset where it has one, else through
    model.encoder.name: its weights file, out_indices of its depth, the data statistics of its pretraining."""
    presets = [stem for stem, n in preset_encoders(ENCODER_DIR).items() if n == name]
    spec, depth = spec_of(name), arch_of(name).depth
    for head in ("naive", "mla"):
        overrides = [f"model=setr_{head}"] + ([f"model/encoder={presets[0]}"] if presets
                                              else [f"model.encoder.name={name}"])
        cfg = _compose(*overrides, config="summary")
        model = OmegaConf.to_container(cfg.model, resolve=True)
        enc = model["encoder"]
        assert enc["name"] == name
        assert enc["pretrained"].endswith("/" + default_weights(name).name)
        assert len(enc["out_indices"]) == 4 and enc["out_indices"] == sorted(set(enc["out_indices"]))
        assert enc["out_indices"][0] >= 0 and enc["out_indices"][-1] == depth - 1
        assert list(cfg.data.mean) == pytest.approx(spec.mean) and list(cfg.data.std) == pytest.approx(spec.std)


# ---------------------------------------------------------------------------------------- experiment presets
def test_the_modern_presets_are_all_there():
    files = {p.stem for p in (CONF_DIR / "experiment").glob("*.yaml")}
    assert {f for f in files if f.endswith(tuple(f"_{s}" for s in MODERN))} == set(PRESETS)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_modern_preset_composes_to_its_recipe(name):
    data, head, short = PRESETS[name]
    preset, table = MODERN[short]
    crop, batch, steps = DATA[data]
    doc = yaml.safe_load((CONF_DIR / "experiment" / f"{name}.yaml").read_text())
    assert "published" not in doc, "no SETR-head number is published on this encoder"
    assert {"override /model/encoder": preset} in doc["defaults"]

    cfg = _compose(f"experiment={name}")
    assert cfg.published is None
    model = OmegaConf.to_container(cfg.model, resolve=True)
    assert cfg.data.name == data and cfg.data.crop_size == crop and model["head"]["name"] == head
    assert model["encoder"]["name"] == table and model["encoder"]["img_size"] == crop
    assert model["encoder"]["drop_prefix_tokens"] is False, "the prefix / register tokens stay, MLA included"
    assert model["encoder"]["pretrained"].endswith("/" + default_weights(table).name)
    assert cfg.trainer.devices * cfg.data.batch_size == 8 * batch and cfg.trainer.max_steps == steps
    assert cfg.trainer.val_check_interval == steps // 10 and "DDPStrategy" in cfg.trainer.strategy._target_

    # the recipe: conf/optimizer/adamw.yaml with lr 1e-4, weight decay 0.05 and the table's layer decay
    opt = OmegaConf.to_container(cfg.optimizer, resolve=True)
    want = OmegaConf.to_container(_compose("optimizer=adamw", "optimizer.lr=1e-4", "optimizer.weight_decay=0.05",
                                           f"optimizer.layer_decay={spec_of(table).layer_decay}").optimizer)
    assert opt == want
    assert opt["name"] == "adamw" and opt["head_lr_mult"] == 10 and opt["layer_decay"] == 0.9
    assert opt["scheduler"]["name"] == "poly" and opt["scheduler"]["warmup_steps"] == 1500
    assert opt["scheduler"]["min_lr"] == 0

    # evaluation composes it too (eval.yaml has no optimizer group) and prints no published number
    assert _compose(f"experiment={name}", "ckpt_path=x.ckpt", config="eval").get("published") is None


@pytest.mark.parametrize("name, mean, std", [
    ("ade20k_mla_eva02_l", CLIP_MEAN_255, CLIP_STD_255), ("cityscapes_pup_eva02_l", CLIP_MEAN_255, CLIP_STD_255),
    ("ade20k_mla_dinov2_l", IMAGENET_MEAN_255, IMAGENET_STD_255),
    ("cityscapes_naive_dinov3_l", IMAGENET_MEAN_255, IMAGENET_STD_255),
])
def test_data_statistics_follow_the_encoder(name, mean, std):
    """EVA-02 was pre-trained on OpenAI CLIP's statistics, DINOv2 / DINOv3 on ImageNet's."""
    data = OmegaConf.to_container(_compose(f"experiment={name}").data, resolve=True)
    assert data["mean"] == pytest.approx(mean) and data["std"] == pytest.approx(std)


@pytest.mark.parametrize("short", sorted(MODERN))
def test_modern_recipe_builds_layer_decayed_groups(short):
    """The preset's optimizer on a tiny model of the same encoder family (MLA, prefix tokens kept): the last block
    at 0.9 x lr, the patch embedding at 0.9^(depth + 1), the heads at 10 x lr, no decay on position embeddings and
    prefix tokens; one forward pass runs."""
    import torch

    from setr.models import build_setr
    from setr.training.optim import build_optimizer

    cfg = _compose(f"experiment=ade20k_mla_{short}", "model.encoder.pretrained=none", "data.crop_size=64",
                   "+model.encoder.arch={embed_dim: 64, depth: 4, num_heads: 2}", "model.head.neck.channels=16",
                   "model.head.decode.channels=8", "data.num_classes=3")
    model = build_setr(OmegaConf.to_container(cfg.model, resolve=True))
    groups = {g["name"]: g for g in build_optimizer(model, cfg.optimizer).param_groups}
    lr = 1e-4
    assert groups["backbone_layer4"]["lr"] == pytest.approx(lr * 0.9)
    assert groups["backbone_layer1"]["lr"] == pytest.approx(lr * 0.9**4)
    assert groups["backbone_no_decay_layer0"]["lr"] == pytest.approx(lr * 0.9**5)
    assert groups["head"]["lr"] == pytest.approx(10 * lr) and groups["head"]["weight_decay"] == 0.05
    in_layer0 = {id(p) for p in groups["backbone_no_decay_layer0"]["params"]}
    prefix = [t for t in (getattr(model.encoder.vit, a, None) for a in ("cls_token", "reg_token", "pos_embed"))
              if t is not None]
    assert prefix and all(id(t) in in_layer0 for t in prefix)
    assert groups["backbone_no_decay_layer0"]["weight_decay"] == 0.0
    with torch.no_grad():
        out = model.eval()(torch.zeros(1, 3, 64, 64))
    out = out[0] if isinstance(out, (list, tuple)) else out
    assert out.shape == (1, 3, 64, 64)


@pytest.mark.parametrize("short", sorted(MODERN))
def test_modern_preset_stops_on_a_missing_weights_file(tmp_path, short):
    """Before anything is built: one line naming the table's file in paths.weights_dir and where to get it."""
    from setr.errors import SETRConfigError
    from setr.utils.config import check_pretrained

    table = MODERN[short][1]
    cfg = _compose(f"experiment=cityscapes_pup_{short}", f"paths.weights_dir={tmp_path}")
    with pytest.raises(SETRConfigError) as e:
        check_pretrained(cfg)
    msg, w = str(e.value), default_weights(table)
    assert "\n" not in msg and msg.startswith(f"model.encoder.pretrained: weights file {tmp_path}/{w.name} not found")
    assert w.url in msg
