"""SETR decoders: Naive / PUP (one :class:`UpHead` family), the MLA neck and head, and the MLA auxiliary head.

Structures follow the official code (fudan-zvg/SETR) by default. mmsegmentation's re-implementation (1.x; the
``model/head=*_mmseg`` presets build mmseg 1.2.2's released SETR models exactly) differs in a few places; those
are constructor switches (``conv_bias``, ``up_scales``, ``align_corners``, ``cls_kernel``, ``bias``,
``deepest_first``) plus the encoder's ``patch_bias``, so its checkpoints load with identical logits:

===========================  ===============================  ===================================================
what                         official                         mmsegmentation (1.2.2)
===========================  ===============================  ===================================================
ViT patch-embedding bias     yes                              no (``model.encoder.patch_bias: false``)
Naive decode head            LN, 1x1 conv+BN+ReLU, cls,       LN, 1x1 conv+BN+ReLU, 4x up, cls, resize 4x
                             resize 16x                       (``up_scales: [4]``)
Naive auxiliary heads (3)    as the decode head               ADE20K: 2 x (1x1 conv+BN+ReLU, 4x up), cls
                                                              (``up_scales: [4, 4]``); Cityscapes: 1 x (1x1
                                                              conv+BN+ReLU, 4x up), cls (``naive_mmseg_cityscapes``)
PUP decode head              4 x (3x3 conv+BN+ReLU), 2x up    4 x (3x3 conv+BN+ReLU, 2x up), then cls
                             after the first three, cls, 2x   (``up_scales: [2, 2, 2, 2]``)
PUP auxiliary heads          4 (layers 10/15/20/24): 3x3      3 (layers 10/15/20): 2 x (3x3 conv+BN+ReLU, 4x up),
                             conv+BN+ReLU, 4x up, cls         cls (``up_scales: [4, 4]``; ADE20K and Cityscapes)
conv bias (Naive/PUP)        yes                              no (``conv_bias: false``)
MLA neck output order        shallow first (p6, .., p24)      deepest first: output k = ``feat_extract.k`` on the
                                                              top-down sum of level 3-k (``deepest_first: true``)
MLA 4x up align_corners      True                             False
MLA concat order             p6, p12, p18, p24                the neck's order (deepest first)
MLA classifier               3x3                              1x1
MLA aux classifier bias      no                               yes (FCNHead ``num_convs=0``: ``conv_seg`` only)
MLA aux k reads              level k, shallow first           neck output k (k=0: the deepest sum)
===========================  ===============================  ===================================================

Every "up" is bilinear, ``align_corners=False`` except the official MLA 4x. In both codes a conv stage is conv ->
BN -> ReLU (BN eps 1e-5), the head LayerNorms have eps 1e-6, and the classifier is the last module of each head.

State-dict names, ours <- mmsegmentation (``auxiliary_heads.{k}`` <- ``auxiliary_head.{k}`` the same way):

- up heads: ``norm`` <- ``norm``; ``stages.{j}.0`` (conv) <- ``up_convs.{j}.0.conv``; ``stages.{j}.1`` (BN) <-
  ``up_convs.{j}.0.bn``; ``cls`` <- ``conv_seg``.
- MLA neck: ``neck.norms.{i}`` <- ``neck.norm.{i}``; ``neck.proj.{i}.0`` / ``.1`` <- ``neck.mla.channel_proj.{i}
  .conv`` / ``.bn``; ``neck.fuse.{k}.0`` / ``.1`` <- ``neck.mla.feat_extract.{k}.conv`` / ``.bn`` (same ``k``
  with ``deepest_first``).
- MLA head: ``branches.{k}.{m}.0`` / ``.1`` <- ``up_convs.{k}.{m}.conv`` / ``.bn`` (m = 0, 1); ``cls`` <-
  ``conv_seg``. MLA aux: ``cls`` <- ``conv_seg``.

Every head returns logits at its own output resolution; :class:`setr.models.SETR` resizes them to the input
(bilinear, ``align_corners=False``), as mmsegmentation's loss and inference do.

Every head has an ``in_index``, as mmsegmentation's decode heads: a position (or, for the MLA head, a list of
positions) in the list of maps that feeds the heads, i.e. the encoder's ``out_indices`` maps or the neck's
levels. :class:`setr.models.SETR` hands each head ``feeds[in_index]`` and knows no head type. The types are
registered in :mod:`setr.models.registry`, which is how the config names them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from setr.models.norm import ChannelLayerNorm, build_norm
from setr.models.registry import HEADS, NECKS
from setr.models.resize import resize

# conv-stage keys of the up heads: a model preset (setr_small) sets them for its PUP head, and they must not
# break a head type without conv stages swapped in for it (model/head=mla): those types accept and drop them
UP_STAGE_KEYS = ("channels", "kernel_size", "up_scales", "conv_bias")


def _one_position(in_index, what: str) -> int:
    if isinstance(in_index, bool) or not isinstance(in_index, int):
        raise ValueError(f"in_index: {what} reads one map, so in_index is one position, got {in_index!r}")
    return in_index


def _positions(in_index, what: str) -> list[int]:
    if not isinstance(in_index, Sequence) or isinstance(in_index, str) or not in_index or any(
            isinstance(i, bool) or not isinstance(i, int) for i in in_index):
        raise ValueError(f"in_index: {what} reads several maps, so in_index is a list of positions, "
                         f"got {in_index!r}")
    return list(in_index)


class ConvNormAct(nn.Sequential):
    """conv -> norm -> ReLU, the unit every SETR decoder is made of."""

    def __init__(self, cin: int, cout: int, kernel_size: int, bias: bool, norm: str) -> None:
        super().__init__(
            nn.Conv2d(cin, cout, kernel_size, padding=kernel_size // 2, bias=bias),
            build_norm(norm, cout),
            nn.ReLU(inplace=True),
        )


@HEADS.register("up")
class UpHead(nn.Module):
    """Naive and PUP heads (main and auxiliary): LN over ViT channels, conv stages with upsampling, classifier.

    Args:
        in_channels: ViT width (1024 for ViT-L).
        num_classes: output classes.
        channels: width of the conv stages (256 in every SETR config).
        kernel_size: kernel of the conv stages (Naive 1, PUP 3).
        up_scales: one entry per conv stage: the bilinear upsampling factor after that stage (1 = none).
            Official Naive ``[1]``, official PUP ``[2, 2, 2, 1]`` (its last 2x is on the logits), official PUP aux
            ``[4]``; mmseg (``SETRUPHead``: ``num_convs`` stages, each followed by its ``up_scale``) Naive ``[4]``,
            PUP ``[2, 2, 2, 2]``, ADE20K Naive aux and PUP aux ``[4, 4]``, Cityscapes Naive aux ``[4]``.
        conv_bias: bias in the stage convs (official True, mmseg False).
        norm: norm layer of the stages (``bn``, ``syncbn``, ``gn``).
        in_index: position of this head's input in the maps that feed the heads (see the module docstring);
            mmseg's SETR configs use 3 for the decode head (the last of four blocks), 0..2(3) for the auxiliary.
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        channels: int = 256,
        kernel_size: int = 1,
        up_scales: Sequence[int] = (1,),
        conv_bias: bool = True,
        norm: str = "bn",
        in_index: int = -1,
    ) -> None:
        super().__init__()
        self.in_index = _one_position(in_index, "an 'up' head")
        self.norm = ChannelLayerNorm(in_channels, eps=1e-6)
        self.up_scales = [int(s) for s in up_scales]
        if not self.up_scales or min(self.up_scales) < 1:
            raise ValueError(f"up_scales: must be a non-empty list of factors >= 1, got {list(up_scales)}")
        stages = []
        cin = in_channels
        for _ in self.up_scales:
            stages.append(ConvNormAct(cin, channels, kernel_size, conv_bias, norm))
            cin = channels
        self.stages = nn.ModuleList(stages)
        self.cls = nn.Conv2d(channels, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(x)
        for stage, scale in zip(self.stages, self.up_scales):
            x = stage(x)
            if scale > 1:
                x = resize(x, scale_factor=scale, align_corners=False)
        return self.cls(x)


@NECKS.register("mla")
class MLANeck(nn.Module):
    """Multi-level feature aggregation neck (official ``Conv_MLA`` with its per-level LayerNorms; mmseg ``MLANeck``).

    Inputs: every map the encoder returns (its ``out_indices``, shallow to deep; mmseg's ``MLANeck`` has no
    ``in_index`` either), so ``num_levels`` is the length of ``out_indices``. Each gets LN -> 1x1 conv -> BN ->
    ReLU (``proj``); the projections are summed top-down from the deepest level; each sum goes through 3x3 conv ->
    BN -> ReLU (``fuse``). Lives outside any ``*head*`` name, so it trains at the backbone's LR as in both codes.

    ``deepest_first=False`` (official): ``fuse[i]`` works on level i's sum and the levels come back shallow to
    deep (p6, p12, p18, p24). ``deepest_first=True`` (mmseg's ``MLAModule``, which sums over the reversed list):
    ``fuse[k]`` works on the sum of level ``num_levels-1-k`` and output k is its result, so output 0 is the
    deepest level (layer 24's projection alone) and ``fuse.k`` is mmseg's ``feat_extract.k``.
    """

    def __init__(self, in_channels: int, channels: int = 256, num_levels: int = 4, norm: str = "bn",
                 deepest_first: bool = False) -> None:
        super().__init__()
        self.num_levels = num_levels
        self.deepest_first = bool(deepest_first)
        self.norms = nn.ModuleList(ChannelLayerNorm(in_channels, eps=1e-6) for _ in range(num_levels))
        self.proj = nn.ModuleList(ConvNormAct(in_channels, channels, 1, False, norm) for _ in range(num_levels))
        self.fuse = nn.ModuleList(ConvNormAct(channels, channels, 3, False, norm) for _ in range(num_levels))
        self.out_channels = channels

    def forward(self, feats: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        if len(feats) != self.num_levels:
            raise ValueError(f"the MLA neck has {self.num_levels} levels, got {len(feats)} maps")
        projected = [p(n(f)) for f, n, p in zip(feats, self.norms, self.proj)]
        sums: list[torch.Tensor] = []  # top-down: the deepest level's projection, then running sums
        for p in reversed(projected):
            sums.append(p if not sums else sums[-1] + p)
        if not self.deepest_first:
            sums.reverse()  # shallow first again: sums[i] belongs to level i
        return [f(s) for f, s in zip(self.fuse, sums)]


@HEADS.register("mla")
class MLAHead(nn.Module):
    """SETR-MLA decode head: per level two 3x3 conv+BN+ReLU and a 4x upsample, concatenation, classifier.

    ``in_index`` lists the levels it reads (all four neck levels in SETR-MLA, mmseg's ``in_index=(0, 1, 2, 3)``);
    there is one branch per entry, and the branches are concatenated in that order (the neck's order: shallow
    first in the official code, deepest first in mmseg's). Official: ``align_corners=True``, 3x3 classifier;
    mmseg's ``SETRMLAHead``: ``align_corners=False``, 1x1 classifier (``conv_seg``).
    """

    def __init__(self, in_channels: int, num_classes: int, channels: int = 128,
                 in_index: Sequence[int] = (0, 1, 2, 3), align_corners: bool = True, cls_kernel: int = 3,
                 up_scale: int = 4, norm: str = "bn") -> None:
        super().__init__()
        self.in_index = _positions(in_index, "an 'mla' head")
        num_levels = len(self.in_index)
        self.align_corners = align_corners
        self.up_scale = up_scale
        self.branches = nn.ModuleList(
            nn.Sequential(ConvNormAct(in_channels, channels, 3, False, norm),
                          ConvNormAct(channels, channels, 3, False, norm))
            for _ in range(num_levels)
        )
        self.cls = nn.Conv2d(channels * num_levels, num_classes, cls_kernel, padding=cls_kernel // 2)

    def forward(self, feats: Sequence[torch.Tensor]) -> torch.Tensor:
        outs = [
            resize(b(f), scale_factor=self.up_scale, align_corners=self.align_corners)
            for b, f in zip(self.branches, feats)
        ]
        return self.cls(torch.cat(outs, dim=1))


@HEADS.register("linear", ignore=UP_STAGE_KEYS)
class LinearAuxHead(nn.Module):
    """SETR-MLA auxiliary head: a 1x1 classifier on one neck output (official: no bias; mmseg: bias)."""

    def __init__(self, in_channels: int, num_classes: int, bias: bool = False, in_index: int = -1) -> None:
        super().__init__()
        self.in_index = _one_position(in_index, "a 'linear' head")
        self.cls = nn.Conv2d(in_channels, num_classes, 1, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.cls(x)
