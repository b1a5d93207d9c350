"""Norm-layer factory shared by every head and neck."""

from __future__ import annotations

from torch import nn

from setr.errors import SETRConfigError

NORM_LAYERS = ("bn", "syncbn", "gn")


def build_norm(kind: str, channels: int) -> nn.Module:
    """Return the 2-D norm named ``kind`` for ``channels`` feature maps.

    ``bn`` is the default; ``syncbn`` is for multi-GPU training (PyTorch refuses it on CPU, where the
    Lightning module keeps ``bn``); ``gn`` (32 groups) suits tiny per-device batches.
    """
    if kind == "bn":
        return nn.BatchNorm2d(channels)
    if kind == "syncbn":
        return nn.SyncBatchNorm(channels)
    if kind == "gn":
        return nn.GroupNorm(min(32, channels), channels)
    raise SETRConfigError(f"model.norm: unknown norm layer {kind!r}; choose one of {', '.join(NORM_LAYERS)}")


class ChannelLayerNorm(nn.LayerNorm):
    """LayerNorm over the channel axis of an NCHW map (what SETR's heads apply to ViT tokens). The result is
    made NCHW-contiguous, unless ``keep_layout`` (set by ``model.channels_last``): then it keeps the
    channels-last strides the normalisation produces, with no copy."""

    keep_layout = False

    def forward(self, x):  # type: ignore[override]
        y = super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return y if self.keep_layout else y.contiguous()
