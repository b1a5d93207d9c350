"""Reference modules for the tests: a line-by-line transcription of mmsegmentation 1.2.2's SETR head modules
(``SETRUPHead``, ``MLANeck`` / ``MLAModule``, ``SETRMLAHead``, ``FCNHead`` with ``num_convs=0``; mmseg/models/
decode_heads/setr_up_head.py, setr_mla_head.py, fcn_head.py, necks/mla_neck.py), with mmcv's ``ConvModule`` as conv
(no bias) -> bn -> activate, so their state-dict names are mmseg's. ``tests/models/test_model.py`` loads this
project's ``*_mmseg`` heads into them through :data:`MMSEG_KEY_RULES` and compares the logits."""

from __future__ import annotations

import re

import torch
from torch import nn


class _ConvModule(nn.Module):
    def __init__(self, cin, cout, k):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, padding=(k - 1) // 2, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        self.activate = nn.ReLU(inplace=True)

    def forward(self, x):
        return self.activate(self.bn(self.conv(x)))


class _Upsample(nn.Module):  # mmseg.models.utils.Upsample (SETRMLAHead): resize to int(size * scale)
    def __init__(self, scale):
        super().__init__()
        self.scale = scale

    def forward(self, x):
        size = [int(t * self.scale) for t in x.shape[-2:]]
        return nn.functional.interpolate(x, size=size, mode="bilinear", align_corners=False)


class _SETRUPHead(nn.Module):
    def __init__(self, cin, channels, num_classes, num_convs, up_scale, kernel_size):
        super().__init__()
        self.norm = nn.LayerNorm(cin, eps=1e-6)
        self.up_convs = nn.ModuleList()
        for i in range(num_convs):
            self.up_convs.append(nn.Sequential(
                _ConvModule(cin if i == 0 else channels, channels, kernel_size),
                nn.Upsample(scale_factor=up_scale, mode="bilinear", align_corners=False)))
        self.conv_seg = nn.Conv2d(channels, num_classes, 1)

    def forward(self, x):
        n, c, h, w = x.shape
        x = self.norm(x.reshape(n, c, h * w).transpose(2, 1)).transpose(1, 2).reshape(n, c, h, w)
        for up_conv in self.up_convs:
            x = up_conv(x)
        return self.conv_seg(x)


class _MLAModule(nn.Module):
    def __init__(self, cin, cout, n=4):
        super().__init__()
        self.channel_proj = nn.ModuleList(_ConvModule(cin, cout, 1) for _ in range(n))
        self.feat_extract = nn.ModuleList(_ConvModule(cout, cout, 3) for _ in range(n))

    def forward(self, inputs):
        feat_list = [conv(x) for x, conv in zip(inputs, self.channel_proj)][::-1]
        mid_list = []
        for feat in feat_list:
            mid_list.append(feat if not mid_list else mid_list[-1] + feat)
        return [conv(mid) for mid, conv in zip(mid_list, self.feat_extract)]


class _MLANeck(nn.Module):
    def __init__(self, cin, cout, n=4):
        super().__init__()
        self.norm = nn.ModuleList(nn.LayerNorm(cin, eps=1e-6) for _ in range(n))
        self.mla = _MLAModule(cin, cout, n)

    def forward(self, inputs):
        outs = []
        for x, norm in zip(inputs, self.norm):
            n, c, h, w = x.shape
            outs.append(norm(x.reshape(n, c, h * w).transpose(2, 1)).transpose(1, 2).reshape(n, c, h, w))
        return self.mla(outs)


class _SETRMLAHead(nn.Module):
    def __init__(self, cin, mla_channels, num_classes, n=4, up_scale=4):
        super().__init__()
        self.up_convs = nn.ModuleList(
            nn.Sequential(_ConvModule(cin, mla_channels, 3), _ConvModule(mla_channels, mla_channels, 3),
                          _Upsample(up_scale)) for _ in range(n))
        self.conv_seg = nn.Conv2d(n * mla_channels, num_classes, 1)

    def forward(self, inputs):
        return self.conv_seg(torch.cat([up(x) for x, up in zip(inputs, self.up_convs)], dim=1))


class _FCNHead0(nn.Module):  # FCNHead(num_convs=0, concat_input=False): convs is Identity, then conv_seg
    def __init__(self, channels, num_classes):
        super().__init__()
        self.conv_seg = nn.Conv2d(channels, num_classes, 1)

    def forward(self, x):
        return self.conv_seg(x)


# our state-dict key -> mmseg's (heads and neck; the encoder's keys are the encoder's converter's)
MMSEG_KEY_RULES = [
    (r"^(decode_head|auxiliary_heads\.\d+)\.stages\.(\d+)\.0\.", r"\1.up_convs.\2.0.conv."),
    (r"^(decode_head|auxiliary_heads\.\d+)\.stages\.(\d+)\.1\.", r"\1.up_convs.\2.0.bn."),
    (r"^decode_head\.branches\.(\d+)\.(\d+)\.0\.", r"decode_head.up_convs.\1.\2.conv."),
    (r"^decode_head\.branches\.(\d+)\.(\d+)\.1\.", r"decode_head.up_convs.\1.\2.bn."),
    (r"^neck\.norms\.", "neck.norm."),
    (r"^neck\.proj\.(\d+)\.0\.", r"neck.mla.channel_proj.\1.conv."),
    (r"^neck\.proj\.(\d+)\.1\.", r"neck.mla.channel_proj.\1.bn."),
    (r"^neck\.fuse\.(\d+)\.0\.", r"neck.mla.feat_extract.\1.conv."),
    (r"^neck\.fuse\.(\d+)\.1\.", r"neck.mla.feat_extract.\1.bn."),
    (r"\.cls\.", ".conv_seg."),
    (r"^auxiliary_heads\.", "auxiliary_head."),
]


def mmseg_key(key: str) -> str:
    for pattern, repl in MMSEG_KEY_RULES:
        key = re.sub(pattern, repl, key)
    return key


def mmseg_reference(head: str, dim: int, num_classes: int) -> nn.Module:
    ref = nn.Module()
    if head == "mla_mmseg":
        ref.neck = _MLANeck(dim, 256)
        ref.decode_head = _SETRMLAHead(256, 128, num_classes)
        ref.auxiliary_head = nn.ModuleList(_FCNHead0(256, num_classes) for _ in range(4))
        return ref
    # (num_convs, up_scale, kernel_size) of the configs' decode and auxiliary SETRUPHeads
    decode = {"naive_mmseg": (1, 4, 1), "naive_mmseg_cityscapes": (1, 4, 1), "pup_mmseg": (4, 2, 3)}[head]
    aux = {"naive_mmseg": (2, 4, 1), "naive_mmseg_cityscapes": (1, 4, 1), "pup_mmseg": (2, 4, 3)}[head]
    ref.decode_head = _SETRUPHead(dim, 256, num_classes, *decode)
    ref.auxiliary_head = nn.ModuleList(_SETRUPHead(dim, 256, num_classes, *aux) for _ in range(3))
    return ref


