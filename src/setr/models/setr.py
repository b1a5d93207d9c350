"""SETR = ViT encoder + (optional MLA neck) + decode head + auxiliary heads, as a plain ``nn.Module``."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from setr.errors import SETRConfigError
from setr.models.encoder import ViTEncoder, pad_to_patch
from setr.models.heads import LinearAuxHead, MLAHead, MLANeck, UpHead
from setr.models.norm import NORM_LAYERS


class SETR(nn.Module):
    """SEgmentation TRansformer.

    ``forward(x)`` takes a normalised image batch ``(B, 3, H, W)`` of any size. Sizes that are not multiples of
    the patch size are zero-padded at the bottom/right and the logits are cropped back, so the output always
    matches the input. In eval mode it returns logits ``(B, num_classes, H, W)``; in training mode a dict with
    ``out`` (those logits) and ``aux`` (one logit map per auxiliary head, same size), whose loss weights are
    :attr:`aux_weights`.
    """

    def __init__(
        self,
        encoder: ViTEncoder,
        decode_head: nn.Module,
        auxiliary_heads: Sequence[nn.Module] = (),
        aux_weights: Sequence[float] = (),
        neck: MLANeck | None = None,
        num_classes: int | None = None,
    ) -> None:
        super().__init__()
        self.encoder = encoder
        self.neck = neck
        self.decode_head = decode_head
        self.auxiliary_heads = nn.ModuleList(auxiliary_heads)
        self.aux_weights = [float(w) for w in aux_weights]
        if len(self.aux_weights) != len(self.auxiliary_heads):
            raise ValueError("one loss weight per auxiliary head is required")
        self.num_classes = num_classes
        # the encoder blocks this model reads; heads index into these (or into the neck outputs)
        if neck is not None:
            self._layers = [encoder.resolve_index(i) for i in neck.in_index]
        else:
            wanted = [decode_head.in_index] + [h.in_index for h in self.auxiliary_heads]
            self._layers = sorted({encoder.resolve_index(i) for i in wanted})

    def _features(self, x: torch.Tensor) -> tuple[list[torch.Tensor], dict[int, int]]:
        feats = self.encoder(x, self._layers)
        if self.neck is not None:
            return self.neck(feats), None  # heads index neck levels directly
        return feats, {layer: pos for pos, layer in enumerate(self._layers)}

    def _select(self, feats, where, index):
        if where is None:
            return feats[index]
        return feats[where[self.encoder.resolve_index(index)]]

    def forward(self, x: torch.Tensor):
        h, w = x.shape[-2:]
        x = pad_to_patch(x, self.encoder.patch_size)
        feats, where = self._features(x)
        size = x.shape[-2:]

        def to_input(logits: torch.Tensor) -> torch.Tensor:
            if logits.shape[-2:] != size:
                logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
            return logits[..., :h, :w]

        if isinstance(self.decode_head, MLAHead):
            out = to_input(self.decode_head(feats))
        else:
            out = to_input(self.decode_head(self._select(feats, where, self.decode_head.in_index)))
        if not self.training:
            return out
        aux = [to_input(head(self._select(feats, where, head.in_index))) for head in self.auxiliary_heads]
        return {"out": out, "aux": aux}


# --------------------------------------------------------------------------------------------- building
def _as_dict(cfg: Any, key: str) -> dict:
    if cfg is None:
        return {}
    if not isinstance(cfg, Mapping):
        raise SETRConfigError(f"{key}: expected a mapping, got {type(cfg).__name__}")
    return dict(cfg)


def _pop_known(spec: dict, key: str, allowed: Sequence[str]) -> dict:
    unknown = set(spec) - set(allowed)
    if unknown:
        raise SETRConfigError(f"{key}: unknown key(s) {sorted(unknown)}; allowed: {', '.join(allowed)}")
    return spec


UP_KEYS = ("type", "in_index", "channels", "kernel_size", "up_scales", "conv_bias")
MLA_HEAD_KEYS = ("type", "channels", "align_corners", "cls_kernel", "up_scale")
NECK_KEYS = ("type", "in_index", "channels")
AUX_KEYS = ("type", "in_index", "loss_weight", "channels", "kernel_size", "up_scales", "conv_bias", "bias")


def build_setr(cfg: Mapping) -> SETR:
    """Build :class:`SETR` from a plain config mapping (the ``model`` node of the Hydra config).

    Keys: ``num_classes``, ``norm`` (``bn``/``syncbn``/``gn``), ``encoder`` (kwargs of :class:`ViTEncoder`),
    ``head`` with ``decode`` (``type: up`` or ``mla``), optional ``neck`` (``type: mla``) and optional
    ``auxiliary`` (``type: up`` or ``linear``, a list ``in_index`` -> one head each, ``loss_weight``).
    Unknown keys and bad values raise :class:`SETRConfigError` naming the key.
    """
    cfg = _as_dict(cfg, "model")
    num_classes = cfg.get("num_classes")
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
        raise SETRConfigError(f"model.num_classes: expected a positive integer, got {num_classes!r}")
    norm = cfg.get("norm", "bn")
    if norm not in NORM_LAYERS:
        raise SETRConfigError(f"model.norm: unknown norm layer {norm!r}; choose one of {', '.join(NORM_LAYERS)}")
    enc_cfg = _as_dict(cfg.get("encoder"), "model.encoder")
    enc_cfg.pop("taps", None)  # config-only: the layer indices the head configs interpolate
    try:
        encoder = ViTEncoder(**enc_cfg)
    except TypeError as e:
        raise SETRConfigError(f"model.encoder: {e}") from e
    head_cfg = _as_dict(cfg.get("head"), "model.head")
    _pop_known(head_cfg, "model.head", ("name", "decode", "neck", "auxiliary"))
    dim = encoder.embed_dim

    neck = None
    neck_cfg = _as_dict(head_cfg.get("neck"), "model.head.neck")
    if neck_cfg:
        _pop_known(neck_cfg, "model.head.neck", NECK_KEYS)
        if neck_cfg.pop("type", "mla") != "mla":
            raise SETRConfigError("model.head.neck.type: only 'mla' is available")
        in_index = neck_cfg.pop("in_index", (5, 11, 17, 23))
        in_index = [in_index] if isinstance(in_index, int) else list(in_index)
        for i in in_index:
            encoder.resolve_index(i, "model.head.neck.in_index")
        try:
            neck = MLANeck(dim, norm=norm, in_index=in_index, **neck_cfg)
        except ValueError as e:
            raise SETRConfigError(f"model.head.neck.in_index: {e}") from e

    dec = _as_dict(head_cfg.get("decode"), "model.head.decode")
    if not dec:
        raise SETRConfigError("model.head.decode: missing; pick a head with model/head=naive|pup|mla (or *_mmseg)")
    dtype = dec.pop("type", "up")
    if dtype == "up":
        _pop_known(dec, "model.head.decode", UP_KEYS)
        encoder.resolve_index(dec.get("in_index", -1), "model.head.decode.in_index")
        try:
            decode_head = UpHead(dim, num_classes, norm=norm, **dec)
        except ValueError as e:
            raise SETRConfigError(f"model.head.decode: {e}") from e
        if neck is not None:
            raise SETRConfigError("model.head.decode.type: an 'up' head reads encoder layers; use 'mla' with the MLA neck")
    elif dtype == "mla":
        _pop_known(dec, "model.head.decode", MLA_HEAD_KEYS)
        if neck is None:
            raise SETRConfigError("model.head.decode.type: 'mla' needs model.head.neck (type: mla)")
        decode_head = MLAHead(neck.out_channels, num_classes, num_levels=len(neck.in_index), norm=norm, **dec)
    else:
        raise SETRConfigError(f"model.head.decode.type: unknown head type {dtype!r}; choose 'up' or 'mla'")

    aux_heads, aux_weights = [], []
    aux = _as_dict(head_cfg.get("auxiliary"), "model.head.auxiliary")
    if aux:
        _pop_known(aux, "model.head.auxiliary", AUX_KEYS)
        atype = aux.pop("type", "up")
        weight = float(aux.pop("loss_weight", 0.4))
        if weight < 0:
            raise SETRConfigError(f"model.head.auxiliary.loss_weight: must be >= 0, got {weight}")
        indices = aux.pop("in_index", [])
        indices = [indices] if isinstance(indices, int) else list(indices)
        for i in indices:
            if atype == "up":
                if neck is not None:
                    raise SETRConfigError("model.head.auxiliary.type: use 'linear' auxiliary heads on the MLA neck")
                encoder.resolve_index(i, "model.head.auxiliary.in_index")
                if "bias" in aux:
                    raise SETRConfigError("model.head.auxiliary.bias: applies to 'linear' heads; 'up' heads use conv_bias")
                try:
                    aux_heads.append(UpHead(dim, num_classes, norm=norm, in_index=i, **aux))
                except ValueError as e:
                    raise SETRConfigError(f"model.head.auxiliary: {e}") from e
            elif atype == "linear":
                if neck is None:
                    raise SETRConfigError("model.head.auxiliary.type: 'linear' auxiliary heads read the MLA neck")
                if not 0 <= i < len(neck.in_index):
                    raise SETRConfigError(f"model.head.auxiliary.in_index: {i} is not a neck level (0..{len(neck.in_index) - 1})")
                # conv-stage keys of 'up' heads (e.g. a model preset's `channels`) do not apply to a 1x1 classifier
                lin = {k: v for k, v in aux.items() if k == "bias"}
                aux_heads.append(LinearAuxHead(neck.out_channels, num_classes, in_index=i, **lin))
            else:
                raise SETRConfigError(f"model.head.auxiliary.type: unknown type {atype!r}; choose 'up' or 'linear'")
            aux_weights.append(weight)
    return SETR(encoder, decode_head, aux_heads, aux_weights, neck=neck, num_classes=num_classes)
