"""The encoder table: every plain-ViT encoder SETR's heads can sit on, in one place (in the spirit of timm's
``default_cfgs``).

One :class:`EncoderSpec` per ``model.encoder.name`` holds what is not an architecture fact: the timm model that
builds it, the mean / std of its pretraining (the data pipeline and the checkpoint record follow the encoder's
weights, not a hard-coded ImageNet pair), the blocks each head family reads, the released weight files (names with
the hash prefix where the release has one, and where to get them) and recipe hints (layer decay). Architecture facts
(width, depth, heads, patch size, prefix tokens, position scheme) are read from timm itself, by building the model
on the meta device (:func:`arch_of`): never copied.

Everything reads this table: :class:`setr.models.encoder.ViTEncoder` (which timm model to build, how to run it),
:mod:`setr.models.pretrained` (where a missing file comes from), the released-checkpoint converter (widths and
heads), ``conf/model/encoder/*.yaml`` through resolvers (``setr.out_indices``, ``setr.encoder_mean`` /
``setr.encoder_std``), and the data configs' ``mean`` / ``std``.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

from setr.errors import SETRConfigError
from setr.registry import Registry
from setr.values import IMAGENET_MEAN_255, IMAGENET_STD_255

# OpenAI CLIP's statistics (timm.data.OPENAI_CLIP_MEAN / STD) on the 0..255 scale: EVA-02's pretraining
CLIP_MEAN_255 = (122.7709383, 116.7460125, 104.09373615)
CLIP_STD_255 = (68.5005327, 66.6321579, 70.32316305)

# the blocks each head family reads at depth 24 (1-based layers 10/15/20/24 for Naive / PUP, 6/12/18/24 for MLA),
# as fractions of the depth: the released SETR configs' choice, scaled to other depths by default_out_indices
UP_LAYERS_24 = (10, 15, 20, 24)
MLA_LAYERS_24 = (6, 12, 18, 24)
FAMILIES = ("up", "mla")


@dataclasses.dataclass(frozen=True)
class WeightsFile:
    """A released weights file of an encoder: its name (with the hash prefix where the release names one), what it
    is, and where to get it (a direct URL or the release's download page)."""

    name: str
    what: str
    url: str


@dataclasses.dataclass(frozen=True)
class EncoderSpec:
    """One row of the encoder table.

    Attributes:
        timm_name: the timm model that builds it (``timm.create_model(timm_name, pretrained=False)``).
        mean, std: the normalisation of its pretraining, on the 0..255 scale.
        weights: released weight files, the default (``conf/model/encoder/<preset>.yaml``) first.
        out_indices: the blocks (0-based) each head family reads, where a release configured them
            (``{"up": ..., "mla": ...}``); else :func:`default_out_indices` scales the SETR configs' layers.
        layer_decay: the layer-wise lr decay its fine-tuning recipes use (None: none).
        about: one line for tables and messages.
    """

    timm_name: str
    mean: tuple[float, float, float] = IMAGENET_MEAN_255
    std: tuple[float, float, float] = IMAGENET_STD_255
    weights: tuple[WeightsFile, ...] = ()
    out_indices: dict[str, tuple[int, ...]] = dataclasses.field(default_factory=dict)
    layer_decay: float | None = None
    about: str = ""


@dataclasses.dataclass(frozen=True)
class Arch:
    """What timm builds for an encoder (read from the model, never copied): width, depth, heads, MLP ratio, patch
    size, prefix tokens (class, registers, distillation) and the position scheme (``abs``: learned absolute
    embeddings, resampled to the token grid; ``rope``: rotary embeddings computed for any grid, with or without an
    absolute table as well). ``family``: which timm class runs it (``vit``: ``VisionTransformer``, ``eva``: ``Eva``)."""

    embed_dim: int
    depth: int
    num_heads: int
    mlp_ratio: float
    patch_size: int
    num_prefix_tokens: int
    num_reg_tokens: int
    has_cls_token: bool
    has_dist_token: bool
    position: str
    family: str


ENCODERS: Registry[EncoderSpec] = Registry("encoder")

_JX = "https://github.com/rwightman/pytorch-image-models/releases/download/v0.1-vitjx/"
_DINOV2 = "https://dl.fbaipublicfiles.com/dinov2/"
_DINOV3 = "https://ai.meta.com/resources/models-and-libraries/dinov3-downloads/ (github.com/facebookresearch/dinov3)"
_EVA02 = "https://huggingface.co/Yuxin-CV/EVA-02/tree/main/eva02/pt"
_DEIT = "https://dl.fbaipublicfiles.com/deit/"

# --- the paper's encoders (SETR T-Large / T-Base / DeiT rows), ImageNet statistics as every SETR recipe
ENCODERS.add("vit_large_patch16", EncoderSpec(
    "vit_large_patch16_384", weights=(WeightsFile(
        "jx_vit_large_p16_384-b3be5167.pth", "ViT-L/16, ImageNet-21k pre-trained, ImageNet-1k fine-tuned at 384 px",
        _JX + "jx_vit_large_p16_384-b3be5167.pth"),),
    out_indices={"up": (9, 14, 19, 23), "mla": (5, 11, 17, 23)}, about="SETR T-Large (ViT-L/16, ImageNet-21k)"))
ENCODERS.add("vit_base_patch16", EncoderSpec(
    "vit_base_patch16_384", weights=(WeightsFile(
        "jx_vit_base_p16_384-83fb41ba.pth", "ViT-B/16, ImageNet-21k pre-trained, ImageNet-1k fine-tuned at 384 px",
        _JX + "jx_vit_base_p16_384-83fb41ba.pth"),),
    out_indices={"up": (3, 5, 7, 11), "mla": (2, 5, 8, 11)}, about="SETR T-Base (ViT-B/16, ImageNet-21k)"))
ENCODERS.add("deit_base_distilled_patch16", EncoderSpec(
    "deit_base_distilled_patch16_384", weights=(WeightsFile(
        "deit_base_distilled_patch16_384-d0272ac0.pth", "DeiT-B/16 distilled, ImageNet-1k at 384 px",
        _DEIT + "deit_base_distilled_patch16_384-d0272ac0.pth"),),
    out_indices={"up": (3, 5, 7, 11), "mla": (2, 5, 8, 11)}, about="SETR-*-DeiT (DeiT-B/16 distilled)"))
ENCODERS.add("vit_small_patch16", EncoderSpec("vit_small_patch16_384", about="ViT-S/16 (no released SETR row)"))
ENCODERS.add("vit_tiny_patch16", EncoderSpec("vit_tiny_patch16_384", about="ViT-Ti/16: the CPU default run, tests"))

# --- today's plain ViTs. DINOv2 (Oquab et al. 2023): patch 14, ImageNet statistics; reg4: 4 register tokens
for _size, _short in (("small", "s"), ("base", "b"), ("large", "l"), ("giant", "g")):
    for _reg in ("", "_reg4"):
        _file = f"dinov2_vit{_short}14{_reg}_pretrain.pth"
        ENCODERS.add(f"vit_{_size}_patch14{_reg}_dinov2", EncoderSpec(
            f"vit_{_size}_patch14{_reg}_dinov2",
            weights=(WeightsFile(_file, f"DINOv2 ViT-{_short.upper()}/14{' + 4 registers' if _reg else ''}, LVD-142M",
                                 f"{_DINOV2}dinov2_vit{_short}14{_reg}/{_file}"),),
            layer_decay=0.9, about=f"DINOv2 ViT-{_short.upper()}/14{' (4 registers)' if _reg else ''}"))
# DINOv3 (Simeoni et al. 2025): patch 16, RoPE, 4 register tokens, ImageNet statistics (LVD-1689M weights)
for _size, _short, _hash in (("small", "s", "08c60483"), ("base", "b", "73cec8be"), ("large", "l", "8aa4cbdd")):
    ENCODERS.add(f"vit_{_size}_patch16_dinov3", EncoderSpec(
        f"vit_{_size}_patch16_dinov3",
        weights=(WeightsFile(f"dinov3_vit{_short}16_pretrain_lvd1689m-{_hash}.pth",
                             f"DINOv3 ViT-{_short.upper()}/16, LVD-1689M", _DINOV3),),
        layer_decay=0.9, about=f"DINOv3 ViT-{_short.upper()}/16 (RoPE, 4 registers)"))
# EVA-02 (Fang et al. 2023): patch 14, RoPE + absolute embeddings, SwiGLU; CLIP statistics (MIM on Merged-38M)
for _size, _short in (("base", "B"), ("large", "L")):
    _file = f"eva02_{_short}_pt_m38m_p14.pt" if _short == "L" else "eva02_B_pt_in21k_p14.pt"
    ENCODERS.add(f"eva02_{_size}_patch14", EncoderSpec(
        f"eva02_{_size}_patch14_448", mean=CLIP_MEAN_255, std=CLIP_STD_255,
        weights=(WeightsFile(_file, f"EVA-02-{_short}/14 MIM pre-trained", f"{_EVA02}/{_file}"),),
        layer_decay=0.9, about=f"EVA-02-{_short}/14 (RoPE, SwiGLU, CLIP statistics)"))
# DeiT-III (Touvron et al. 2022): patch 16, layer scale, ImageNet statistics; the ImageNet-21k weights at 384 px
for _size in ("base", "large"):
    _file = f"deit_3_{_size}_384_21k.pth"
    ENCODERS.add(f"deit3_{_size}_patch16", EncoderSpec(
        f"deit3_{_size}_patch16_384",
        weights=(WeightsFile(_file, f"DeiT-III {_size}/16, ImageNet-21k, fine-tuned at 384 px", _DEIT + _file),),
        layer_decay=0.9, about=f"DeiT-III {_size.capitalize()}/16 (layer scale)"))


def spec_of(name: Any, key: str = "model.encoder.name") -> EncoderSpec:
    """The table row of ``name``; one line naming ``key`` and the choices when there is none."""
    return ENCODERS.lookup(name, key)


@functools.cache
def _arch(timm_name: str, overrides: tuple[tuple[str, Any], ...]) -> Arch:
    import timm
    import torch

    with torch.device("meta"):
        vit = timm.create_model(timm_name, pretrained=False, num_classes=0, **dict(overrides))
    attn = getattr(vit.blocks[0], "attn", None)
    mlp = vit.blocks[0].mlp
    hidden = getattr(getattr(mlp, "fc1", None), "out_features", None) or getattr(mlp.fc1_g, "out_features", 0)
    rope = getattr(vit, "rope", None) is not None
    cls, dist = int(getattr(vit, "cls_token", None) is not None), int(getattr(vit, "dist_token", None) is not None)
    return Arch(
        embed_dim=int(vit.embed_dim), depth=len(vit.blocks), num_heads=int(getattr(attn, "num_heads", 0)),
        mlp_ratio=hidden / vit.embed_dim, patch_size=int(vit.patch_embed.patch_size[0]),
        num_prefix_tokens=int(vit.num_prefix_tokens), num_reg_tokens=int(vit.num_prefix_tokens) - cls - dist,
        has_cls_token=bool(cls), has_dist_token=bool(dist),
        position="rope" if rope else "abs", family="eva" if type(vit).__name__ == "Eva" else "vit")


def arch_of(name: str, overrides: dict[str, Any] | None = None, key: str = "model.encoder.name") -> Arch:
    """The architecture timm builds for encoder ``name`` (with ``model.encoder.arch`` ``overrides``), read from a
    model built on the meta device (nothing allocated; cached)."""
    spec = spec_of(name, key)
    return _arch(spec.timm_name, tuple(sorted((overrides or {}).items())))


def default_out_indices(depth: int, family: str) -> list[int]:
    """The blocks (0-based) a head family reads at ``depth``: the SETR configs' layers at depth 24 (Naive / PUP
    10/15/20/24, MLA 6/12/18/24, 1-based) scaled to the depth, rounded down, at least one block apart."""
    if family not in FAMILIES:
        raise SETRConfigError(f"out_indices: unknown head family {family!r}; choose one of {', '.join(FAMILIES)}")
    layers = UP_LAYERS_24 if family == "up" else MLA_LAYERS_24
    if depth < len(layers):
        raise SETRConfigError(f"model.encoder.out_indices: the {family} heads read {len(layers)} blocks; an encoder of "
                              f"{depth} blocks has too few (set model.encoder.out_indices to a list of its blocks)")
    blocks: list[int] = []
    for i, layer in enumerate(layers):  # at least one block apart, leaving room for the ones after
        b = max(depth * layer // 24 - 1, blocks[-1] + 1 if blocks else 0)
        blocks.append(min(b, depth - len(layers) + i))
    return blocks


def out_indices_of(name: str, family: str, depth: int | None = None) -> list[int]:
    """The blocks head family ``family`` reads on encoder ``name``: the release's where the table has them (at the
    encoder's own depth), else :func:`default_out_indices` at ``depth`` (default: the encoder's)."""
    spec = spec_of(name)
    own = arch_of(name).depth
    if family in spec.out_indices and (depth is None or depth == own):
        return list(spec.out_indices[family])
    depth = own if depth is None else int(depth)
    if depth < len(UP_LAYERS_24):  # a shallow test encoder: every block (the heads then say what is missing)
        return list(range(depth))
    return default_out_indices(depth, family)


def default_weights(name: str) -> WeightsFile | None:
    """The encoder's default released weights file (the first of its table row), or None."""
    files = spec_of(name).weights
    return files[0] if files else None


def known_file(file_name: str) -> tuple[str, WeightsFile] | None:
    """(encoder name, its entry) of a released weights file named ``file_name``, or None."""
    for name, spec in ENCODERS.items():
        for w in spec.weights:
            if w.name == file_name:
                return name, w
    return None


def encoder_names(timm_names: Sequence[str] = ()) -> list[str]:
    """The table's encoder names (those built by ``timm_names`` only, when given)."""
    return [n for n, s in ENCODERS.items() if not timm_names or s.timm_name in timm_names]
