"""Norm-layer factory shared by every head and neck."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from setr.registry import Registry

# ``model.norm`` name -> builder of a 2-D norm for a number of channels
NORM_LAYERS: Registry[Callable[[int], nn.Module]] = Registry("norm layer")


@NORM_LAYERS.register("bn")
def _batch_norm(channels: int) -> nn.Module:
    """The default."""
    return nn.BatchNorm2d(channels)


@NORM_LAYERS.register("syncbn")
def _sync_batch_norm(channels: int) -> nn.Module:
    """For multi-GPU training: statistics over every device's batch (PyTorch refuses it on CPU, where the
    Lightning module keeps ``bn``)."""
    return nn.SyncBatchNorm(channels)


@NORM_LAYERS.register("gn")
def _group_norm(channels: int) -> nn.Module:
    """32 groups (fewer for narrow maps): no batch statistics, so it suits tiny per-device batches."""
    return nn.GroupNorm(min(32, channels), channels)


def build_norm(kind: str, channels: int) -> nn.Module:
    """The 2-D norm ``model.norm`` names (a key of :data:`NORM_LAYERS`) for ``channels`` feature maps."""
    return NORM_LAYERS.lookup(kind, "model.norm")(channels)


class ChannelLayerNorm(nn.LayerNorm):
    """LayerNorm over the channel axis of an NCHW map (what SETR's heads apply to ViT tokens). The result is
    made NCHW-contiguous, unless ``keep_layout`` (set by ``model.channels_last``): then it keeps the
    channels-last strides the normalisation produces, with no copy.

    Under autocast to a lower precision the result is in that dtype: in every head and in the MLA neck it feeds a
    convolution, which autocast would make cast it anyway (the same rounding, so the same values). The cast and
    the layout copy are then one copy, instead of a float32 layout copy (the encoder's residual stream, hence the
    norm, is float32) cast down again by the convolution (benchmarks/dtype_copies.py)."""

    keep_layout = False

    def forward(self, x):  # type: ignore[override]
        y = super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        dev = y.device.type
        if torch.amp.is_autocast_available(dev) and torch.is_autocast_enabled(dev):  # meta tensors: no autocast
            low = torch.get_autocast_dtype(dev)
            if low.itemsize < y.dtype.itemsize:
                fmt = torch.preserve_format if self.keep_layout else torch.contiguous_format
                return y.to(low, memory_format=fmt)
        return y if self.keep_layout else y.contiguous()
