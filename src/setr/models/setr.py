"""SETR = ViT encoder + (optional neck) + decode head + auxiliary heads, as a plain ``nn.Module``.

Assembled as mmsegmentation's ``EncoderDecoder``: the encoder returns the maps of its ``out_indices`` blocks; an
optional neck turns them into levels; every head, decode or auxiliary, reads ``feeds[in_index]`` of that list
(a list of maps when ``in_index`` is a list, as the MLA head's). No head type is special-cased, so a new type
only needs registering (:mod:`setr.models.registry`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

import setr.models.heads  # noqa: F401  (registers the head and neck types in HEADS and NECKS)
from setr.errors import SETRConfigError
from setr.models.encoder import ViTEncoder, pad_to_patch
from setr.models.norm import NORM_LAYERS, ChannelLayerNorm
from setr.models.registry import HEADS, NECKS
from setr.models.resize import plain_interpolate, resize

# model.resize: how the heads and the logits are resized (setr.models.resize): matrix products, or F.interpolate
RESIZE_MODES = ("matmul", "interpolate")


def select_inputs(feats: Sequence[torch.Tensor], in_index: int | Sequence[int]):
    """``feats[in_index]``, or the list of those maps for a list of positions (mmseg's
    ``BaseDecodeHead._transform_inputs`` without an input transform)."""
    if isinstance(in_index, int):
        return feats[in_index]
    return [feats[i] for i in in_index]


def feeds_of(encoder: ViTEncoder, neck: nn.Module | None) -> tuple[int, str]:
    """How many maps feed the heads, and what they are (for messages): one per ``out_indices`` block, which a
    neck turns into as many levels."""
    n = len(encoder.out_indices)
    if neck is None:
        return n, "model.encoder.out_indices"
    levels = getattr(neck, "num_levels", n)
    if levels != n:
        raise SETRConfigError(f"model.encoder.out_indices: the neck has {levels} levels but the encoder returns "
                              f"{n} maps {encoder.out_indices}")
    return n, "the neck's levels (one per model.encoder.out_indices block)"


def check_in_index(in_index: int | Sequence[int], n: int, key: str, feeds: str) -> None:
    """Raise :class:`SETRConfigError` (one line naming ``key``) unless every position is in ``-n .. n-1``."""
    for i in [in_index] if isinstance(in_index, int) else list(in_index):
        if not -n <= i < n:
            raise SETRConfigError(f"{key}: position {i} is out of range for the {n} maps of {feeds} "
                                  f"(use 0..{n - 1} or negative positions)")


class SETR(nn.Module):
    """SEgmentation TRansformer.

    ``forward(x)`` takes a normalised image batch ``(B, 3, H, W)`` of any size. Sizes that are not multiples of
    the patch size are zero-padded at the bottom/right and the logits are cropped back, so the output always
    matches the input. In eval mode it returns logits ``(B, num_classes, H, W)``; in training mode a dict with
    ``out`` (those logits) and ``aux`` (one logit map per auxiliary head, same size), whose loss weights are
    :attr:`aux_weights`.

    ``resize``: ``matmul`` resizes features and logits by matrix products (:func:`setr.models.resize.resize`, the
    same function as bilinear ``F.interpolate`` with a fast, deterministic backward); ``interpolate`` runs
    ``F.interpolate`` itself (the reference kernels).

    Each head's ``in_index`` indexes the maps that feed the heads: the encoder's (one per ``out_indices`` block)
    or, with a neck, the neck's levels (the neck reads all the encoder's maps).
    """

    def __init__(
        self,
        encoder: ViTEncoder,
        decode_head: nn.Module,
        auxiliary_heads: Sequence[nn.Module] = (),
        aux_weights: Sequence[float] = (),
        neck: nn.Module | None = None,
        num_classes: int | None = None,
        resize: str = "matmul",
        channels_last: bool = False,
    ) -> None:
        super().__init__()
        if resize not in RESIZE_MODES:
            raise SETRConfigError(f"model.resize: expected one of {', '.join(RESIZE_MODES)}, got {resize!r}")
        self.resize = resize
        self.encoder = encoder
        self.neck = neck
        self.decode_head = decode_head
        self.auxiliary_heads = nn.ModuleList(auxiliary_heads)
        self.aux_weights = [float(w) for w in aux_weights]
        if len(self.aux_weights) != len(self.auxiliary_heads):
            raise ValueError("one loss weight per auxiliary head is required")
        self.num_classes = num_classes
        if not isinstance(channels_last, bool):
            raise SETRConfigError(f"model.channels_last: expected true or false, got {channels_last!r}")
        self.channels_last = channels_last
        if channels_last:
            self._heads_channels_last()
        n, feeds = feeds_of(encoder, neck)
        for name, head in [("decode_head", decode_head)] + [(f"auxiliary_heads.{i}", h)
                                                             for i, h in enumerate(self.auxiliary_heads)]:
            check_in_index(head.in_index, n, f"{name}.in_index", feeds)

    def _heads_channels_last(self) -> None:
        """Convolution weights of the neck and heads in channels-last memory format, and their channel
        LayerNorms keeping the channels-last layout of the encoder's maps (token grids are NHWC already)."""
        for part in (self.neck, self.decode_head, self.auxiliary_heads):
            if part is None:
                continue
            part.to(memory_format=torch.channels_last)
            for m in part.modules():
                if isinstance(m, ChannelLayerNorm):
                    m.keep_layout = True

    def forward(self, x: torch.Tensor, low_res: bool = False):
        """Eval: the logits (B, num_classes, H, W). Training: ``{"out", "aux"}``, each at the input size; with
        ``low_res=True`` the heads' logits before that resize, and ``"size"`` (the padded size they resize to)
        and ``"crop"`` (the input size, the top-left crop of it): what
        :func:`setr.models.seg_loss.upsampled_cross_entropy` takes. ``low_res`` changes nothing in eval mode."""
        if self.resize == "interpolate":
            with plain_interpolate():
                return self._forward(x, low_res)
        return self._forward(x, low_res)

    def _forward(self, x: torch.Tensor, low_res: bool = False):
        h, w = x.shape[-2:]
        x = pad_to_patch(x, self.encoder.patch_size)
        feats = self.encoder(x)
        if self.neck is not None:
            feats = self.neck(feats)
        size = x.shape[-2:]

        def to_input(logits: torch.Tensor) -> torch.Tensor:
            if logits.shape[-2:] != size:
                logits = resize(logits, size=size, align_corners=False)
            return logits[..., :h, :w]

        if self.training and low_res:  # the loss resizes (to `size`) and crops (to h, w) itself
            out = self.decode_head(select_inputs(feats, self.decode_head.in_index))
            aux = [head(select_inputs(feats, head.in_index)) for head in self.auxiliary_heads]
            return {"out": out, "aux": aux, "size": (int(size[0]), int(size[1])), "crop": (int(h), int(w))}
        out = to_input(self.decode_head(select_inputs(feats, self.decode_head.in_index)))
        if not self.training:
            return out
        aux = [to_input(head(select_inputs(feats, head.in_index))) for head in self.auxiliary_heads]
        return {"out": out, "aux": aux}


# --------------------------------------------------------------------------------------------- building
def _as_dict(cfg: Any, key: str) -> dict:
    if cfg is None:
        return {}
    if not isinstance(cfg, Mapping):
        raise SETRConfigError(f"{key}: expected a mapping, got {type(cfg).__name__}")
    return dict(cfg)


def _as_list(v: Any) -> list:
    return [v] if isinstance(v, int) else list(v)


HEAD_KEYS = ("name", "decode", "neck", "auxiliary")
# config-only keys of model.encoder: the table of out_indices per head family that the head presets pick from
# (conf/model/encoder/*.yaml), and `taps`, its name in configs saved before out_indices existed
ENCODER_CONFIG_ONLY = ("out_indices_presets", "taps")


def build_setr(cfg: Mapping) -> SETR:
    """Build :class:`SETR` from a plain config mapping (the ``model`` node of the Hydra config).

    Keys: ``num_classes``, ``norm`` (``bn``/``syncbn``/``gn``), ``resize`` (``matmul``, the default, or
    ``interpolate``: see :mod:`setr.models.resize`), ``channels_last`` (the neck's and heads' convolutions in
    channels-last memory format), ``encoder`` (kwargs of :class:`ViTEncoder`,
    ``out_indices`` among them), ``head`` with ``decode`` (``type``: a registered head, ``up`` by default),
    optional ``neck`` (``type: mla``) and optional ``auxiliary`` (a head ``type``, a list ``in_index`` -> one
    head each, ``loss_weight``). Heads' ``in_index`` are positions in the encoder's ``out_indices`` maps, or in
    the neck's levels when there is a neck. Configs saved before ``out_indices`` existed (block ids as
    ``in_index``, ``encoder.taps``) are translated, so old checkpoints rebuild the network they were trained as.
    Unknown keys and bad values raise :class:`SETRConfigError` naming the key.
    """
    cfg = _as_dict(cfg, "model")
    num_classes = cfg.get("num_classes")
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
        raise SETRConfigError(f"model.num_classes: expected a positive integer, got {num_classes!r}")
    norm = cfg.get("norm", "bn")
    NORM_LAYERS.lookup(norm, "model.norm")  # before any part is built: one line naming the key
    enc_cfg = _as_dict(cfg.get("encoder"), "model.encoder")
    head_cfg = _as_dict(cfg.get("head"), "model.head")
    unknown = set(head_cfg) - set(HEAD_KEYS)
    if unknown:
        raise SETRConfigError(f"model.head: unknown key(s) {sorted(unknown)}; allowed: {', '.join(HEAD_KEYS)}")
    neck_cfg = _as_dict(head_cfg.get("neck"), "model.head.neck")
    dec = _as_dict(head_cfg.get("decode"), "model.head.decode")
    aux = _as_dict(head_cfg.get("auxiliary"), "model.head.auxiliary")
    # saved before out_indices existed: composed configs had encoder.taps; hand-written ones a neck in_index
    legacy = "taps" in enc_cfg or ("in_index" in neck_cfg and "out_indices" not in enc_cfg)
    for k in ENCODER_CONFIG_ONLY:
        enc_cfg.pop(k, None)
    try:
        encoder = ViTEncoder(**enc_cfg)
    except TypeError as e:
        raise SETRConfigError(f"model.encoder: {e}") from e
    if legacy:
        _upgrade_legacy(encoder, neck_cfg, dec, aux)

    neck = None
    if neck_cfg:
        neck = NECKS.build(neck_cfg, "model.head.neck", "mla", in_channels=encoder.embed_dim,
                           num_levels=len(encoder.out_indices), norm=norm)
    # what the heads read: the encoder's maps, or the neck's levels
    in_channels = encoder.embed_dim if neck is None else neck.out_channels
    n_feeds, feeds = feeds_of(encoder, neck)

    if not dec:
        raise SETRConfigError("model.head.decode: missing; pick a head with model/head=naive|pup|mla (or *_mmseg)")
    decode_head = HEADS.build(dec, "model.head.decode", "up", in_channels=in_channels, num_classes=num_classes,
                              norm=norm)
    check_in_index(decode_head.in_index, n_feeds, "model.head.decode.in_index", feeds)

    aux_heads, aux_weights = [], []
    if aux:
        weight = float(aux.pop("loss_weight", 0.4))
        if weight < 0:
            raise SETRConfigError(f"model.head.auxiliary.loss_weight: must be >= 0, got {weight}")
        positions = aux.pop("in_index", [])
        positions = [positions] if isinstance(positions, int) else list(positions)
        for i in positions:  # one head per entry (an entry may itself be a list, for a multi-input head)
            head = HEADS.build(aux, "model.head.auxiliary", "up", in_channels=in_channels, num_classes=num_classes,
                               norm=norm, in_index=i)
            check_in_index(head.in_index, n_feeds, "model.head.auxiliary.in_index", feeds)
            aux_heads.append(head)
            aux_weights.append(weight)
    return SETR(encoder, decode_head, aux_heads, aux_weights, neck=neck, num_classes=num_classes,
                resize=cfg.get("resize", "matmul"), channels_last=cfg.get("channels_last", False))


def _upgrade_legacy(encoder: ViTEncoder, neck: dict, dec: dict, aux: dict) -> None:
    """Translate, in place, a model config saved before ``out_indices`` existed (checkpoints carry theirs).

    Then the heads' (and the MLA neck's) ``in_index`` were 0-based block ids, the MLA decode head read every neck
    level implicitly and ``encoder.taps`` only fed interpolations. Now: the neck's blocks, or the blocks the
    heads read (sorted, once each), become ``out_indices``, and ``in_index`` become positions in that list.
    """
    if neck:
        blocks = _as_list(neck.pop("in_index", (5, 11, 17, 23)))
        encoder.set_out_indices(blocks, "model.head.neck.in_index")
        dec.setdefault("in_index", list(range(len(blocks))))
        return  # auxiliary heads on the neck already indexed its levels
    decode_block = encoder.resolve_block(dec.get("in_index", -1), "model.head.decode.in_index")
    aux_blocks = [encoder.resolve_block(i, "model.head.auxiliary.in_index")
                  for i in _as_list(aux.get("in_index", []))]
    blocks = sorted({decode_block, *aux_blocks})
    encoder.set_out_indices(blocks)
    dec["in_index"] = blocks.index(decode_block)
    if aux:
        aux["in_index"] = [blocks.index(b) for b in aux_blocks]
