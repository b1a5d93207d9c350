"""Released SETR weights -> this project's :class:`setr.models.SETR` (pure functions, no files).

Two foreign layouts are understood (README "Using the released SETR checkpoints"; the files named below):

* ``official``: the authors' code (fudan-zvg/SETR, an mmseg 0.x fork). Backbone with timm names
  (``backbone.blocks.N``, ``backbone.patch_embed.proj`` with bias); MLA neck inside the backbone
  (``backbone.norm_0..3``, ``backbone.mla.mla_p{2..5}_1x1`` / ``mla_p{2..5}``, p2 = the shallowest level); Naive / PUP
  heads ``conv_{i}`` + ``syncbn_fc_{i}`` + ``norm`` (the last ``conv_{i}`` is the classifier); MLA head
  ``mlahead.head{2..5}.{0,1,3,4}`` + ``cls``; MLA auxiliary heads ``aux`` (no bias). Every head's ``conv_seg`` is
  an unused leftover of mmseg's ``BaseDecodeHead``: dropped. Built onto the official structure
  (``model/head=naive|pup|mla``).
* ``mmseg``: mmsegmentation 0.x / 1.x. Backbone ``backbone.layers.N`` (``ln1``, ``attn.attn.in_proj_*``,
  ``attn.attn.out_proj``, ``ln2``, ``ffn.layers.0.0`` / ``ffn.layers.1``), ``patch_embed.projection`` (no bias);
  ``SETRUPHead`` ``norm`` + ``up_convs.J.0.conv/bn`` + ``conv_seg``; ``MLANeck`` ``neck.norm.I`` +
  ``neck.mla.channel_proj.I`` / ``feat_extract.I`` (``conv``/``bn``); ``SETRMLAHead`` ``up_convs.K.{0,1}.conv/bn`` +
  ``conv_seg``; MLA auxiliary ``FCNHead(num_convs=0)`` = ``conv_seg``. Built onto the ``*_mmseg`` structure.

The structure is read from the weights (width, depth, patch, classes, crop = position grid x patch, head type, number
and kernel of conv stages, auxiliary heads, biases, dist token). What weights cannot tell comes from arguments, with
the released configs as defaults: the number of attention heads (1024 -> 16, 768 -> 12), the blocks the heads read
(``out_indices``: (9, 14, 19, 23) Naive / PUP and (5, 11, 17, 23) MLA at depth 24) and the upsampling factors (the
released configs': official Naive x1 then the classifier, 3x3 one-stage (PUP auxiliary) x4, PUP 2/2/2 then x2 on the
logits; mmseg x2 per stage in a four-stage head, else x4 per stage).

:func:`convert_state_dict` returns the ``model`` config for :func:`setr.models.build_setr` and the state dict in
this project's names, in the manner of timm's ``checkpoint_filter_fn``.
"""

from __future__ import annotations

import dataclasses
import itertools
import re
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from setr.errors import SETRConfigError

OFFICIAL, MMSEG = "official", "mmseg"
LAYOUTS = (OFFICIAL, MMSEG)

# the encoders of the released SETR checkpoints (setr.models.encoders): ViT-L and ViT-B by width; their attention
# heads per width are what the weights cannot tell (timm's, read from the encoder table)
RELEASED_ENCODERS = ("vit_large_patch16", "vit_base_patch16")
DISTILLED_ENCODER, OTHER_WIDTH_ENCODER = "deit_base_distilled_patch16", "vit_tiny_patch16"


def released_encoder(embed_dim: int) -> str | None:
    """The encoder of a released SETR config with width ``embed_dim`` (ViT-L 1024, ViT-B 768), or None."""
    from setr.models.encoders import arch_of

    return next((n for n in RELEASED_ENCODERS if arch_of(n).embed_dim == embed_dim), None)


BN_KEYS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


@dataclasses.dataclass
class Converted:
    """The result of :func:`convert_state_dict`: the model config, the weights and what was read from them."""

    model: dict[str, Any]
    state_dict: dict[str, torch.Tensor]
    layout: str
    head: str
    embed_dim: int
    depth: int
    num_heads: int
    crop: int
    num_classes: int
    out_indices: list[int]
    aux_heads: int
    mapped: int
    dropped: list[str]

    def summary(self) -> dict[str, Any]:
        return {"layout": self.layout, "head": self.head, "embed_dim": self.embed_dim, "depth": self.depth,
                "num_heads": self.num_heads, "classes": self.num_classes, "crop": self.crop,
                "out_indices": self.out_indices, "aux_heads": self.aux_heads, "mapped": self.mapped,
                "dropped": self.dropped}


# ------------------------------------------------------------------------------------------- detection
def strip_module_prefix(sd: Mapping[str, Any]) -> dict[str, Any]:
    """Drop a ``module.`` prefix (DataParallel / DDP) that every key carries."""
    sd = dict(sd)
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd


def detect_layout(sd: Mapping[str, Any]) -> str | None:
    """``official``, ``mmseg`` or None (not a released SETR checkpoint) from the state-dict keys."""
    keys = list(sd)
    has = lambda *prefixes: any(k.startswith(prefixes) for k in keys)
    if not has("backbone.blocks.", "backbone.layers.") or not has("decode_head."):
        return None
    if has("decode_head.conv_0.", "decode_head.mlahead.", "backbone.mla."):
        return OFFICIAL
    if has("decode_head.up_convs.", "neck.mla."):
        return MMSEG
    return None


# ------------------------------------------------------------------------------------------ conversion
class _Mapper:
    """Copies source keys to target names and remembers which source keys were used."""

    def __init__(self, sd: Mapping[str, torch.Tensor], where: str) -> None:
        self.sd, self.where = sd, where
        self.out: dict[str, torch.Tensor] = {}
        self.used: set[str] = set()

    def has(self, key: str) -> bool:
        return key in self.sd

    def get(self, key: str) -> torch.Tensor:
        if key not in self.sd:
            raise SETRConfigError(f"{self.where}: weight {key} missing (a truncated or unknown SETR checkpoint)")
        return self.sd[key]

    def take(self, src: str, dst: str, required: bool = True) -> bool:
        if src not in self.sd:
            if required:
                self.get(src)
            return False
        self.out[dst] = self.sd[src]
        self.used.add(src)
        return True

    def module(self, src: str, dst: str, names: Sequence[str] = ("weight", "bias"),
               required: Sequence[str] = ()) -> None:
        """Copy ``src.<name>`` -> ``dst.<name>`` for each name present (those in ``required`` must be)."""
        for n in names:
            self.take(f"{src}.{n}", f"{dst}.{n}", required=n in required)

    def conv(self, src: str, dst: str) -> None:
        self.module(src, dst, ("weight", "bias"), required=("weight",))

    def bn(self, src: str, dst: str) -> None:
        self.module(src, dst, BN_KEYS, required=("weight", "bias", "running_mean", "running_var"))

    def ln(self, src: str, dst: str) -> None:
        self.module(src, dst, ("weight", "bias"), required=("weight", "bias"))


def _indices(keys: Sequence[str], prefix: str, sep: str = ".") -> list[int]:
    """Sorted integers ``N`` of keys ``<prefix>N<sep>…``."""
    pat = re.compile(re.escape(prefix) + r"(\d+)" + re.escape(sep))
    return sorted({int(m.group(1)) for k in keys if (m := pat.match(k))})


def _encoder(m: _Mapper, layout_blocks: str, num_heads: int | None) -> dict[str, Any]:
    """Map the ViT (``blocks`` = timm names, ``layers`` = mmcv names) onto ``encoder.vit.*``; return its facts."""
    sd, where = m.sd, m.where
    keys = list(sd)
    if layout_blocks == "blocks":
        blocks = _indices(keys, "backbone.blocks.")
        for i in blocks:
            for part in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2"):
                m.module(f"backbone.blocks.{i}.{part}", f"encoder.vit.blocks.{i}.{part}", required=("weight",))
        patch = "backbone.patch_embed.proj"
    else:
        blocks = _indices(keys, "backbone.layers.")
        for i in blocks:
            s, d = f"backbone.layers.{i}", f"encoder.vit.blocks.{i}"
            m.ln(f"{s}.ln1", f"{d}.norm1")
            m.take(f"{s}.attn.attn.in_proj_weight", f"{d}.attn.qkv.weight")
            m.take(f"{s}.attn.attn.in_proj_bias", f"{d}.attn.qkv.bias", required=False)
            m.module(f"{s}.attn.attn.out_proj", f"{d}.attn.proj", required=("weight",))
            m.ln(f"{s}.ln2", f"{d}.norm2")
            m.module(f"{s}.ffn.layers.0.0", f"{d}.mlp.fc1", required=("weight",))
            m.module(f"{s}.ffn.layers.1", f"{d}.mlp.fc2", required=("weight",))
        patch = "backbone.patch_embed.projection"
    if blocks != list(range(len(blocks))):
        raise SETRConfigError(f"{where}: transformer blocks {blocks} are not numbered 0..N-1")
    depth = len(blocks)
    m.take(f"{patch}.weight", "encoder.vit.patch_embed.proj.weight")
    patch_bias = m.take(f"{patch}.bias", "encoder.vit.patch_embed.proj.bias", required=False)
    m.take("backbone.cls_token", "encoder.vit.cls_token")
    m.take("backbone.pos_embed", "encoder.vit.pos_embed")
    distilled = m.take("backbone.dist_token", "encoder.vit.dist_token", required=False)
    unsupported = [k for k in keys if k.startswith(("backbone.ln1.", "backbone.pre_ln.", "backbone.patch_embed.norm.",
                                                    "backbone.norm.", "backbone.fc_norm."))]
    if unsupported:
        raise SETRConfigError(f"{where}: {unsupported[0]}: a final / pre / patch norm in the ViT is not part of SETR "
                              "(no released SETR config has one)")
    qkv = m.out.get("encoder.vit.blocks.0.attn.qkv.bias")
    if qkv is None:
        raise SETRConfigError(f"{where}: the attention has no qkv bias; SETR's ViT always has one")
    pos, proj = m.out["encoder.vit.pos_embed"], m.out["encoder.vit.patch_embed.proj.weight"]
    embed_dim, patch_size = int(pos.shape[-1]), int(proj.shape[-1])
    if patch_size != 16 or proj.shape[-2] != 16:
        raise SETRConfigError(f"{where}: patch size {tuple(proj.shape[-2:])}; only 16x16 patches are supported")
    prefix = 2 if distilled else 1
    n = int(pos.shape[1]) - prefix
    side = round(n ** 0.5)
    if side * side != n:
        raise SETRConfigError(f"{where}: pos_embed holds {n} patch positions, not a square grid")
    hidden = int(m.out["encoder.vit.blocks.0.mlp.fc1.weight"].shape[0])
    from setr.models.encoders import arch_of

    released = released_encoder(embed_dim)
    if num_heads is None:
        if released is None:
            raise SETRConfigError(f"--num-heads: width {embed_dim} has no released SETR config; pass --num-heads N")
        num_heads = arch_of(released).num_heads
    if num_heads < 1 or embed_dim % num_heads:
        raise SETRConfigError(f"--num-heads: {num_heads} does not divide the width {embed_dim}")
    name = DISTILLED_ENCODER if distilled else released or OTHER_WIDTH_ENCODER
    a = arch_of(name)
    base = {"embed_dim": a.embed_dim, "depth": a.depth, "num_heads": a.num_heads, "mlp_ratio": a.mlp_ratio}
    want = {"embed_dim": embed_dim, "depth": depth, "num_heads": num_heads, "mlp_ratio": hidden / embed_dim}
    arch = {k: v for k, v in want.items() if v != base[k]}
    return {"name": name, "arch": arch, "embed_dim": embed_dim, "depth": depth, "num_heads": num_heads,
            "crop": side * patch_size, "patch_bias": patch_bias}


def _aux_prefixes(keys: Sequence[str]) -> list[str]:
    """``auxiliary_head.K.`` for each K (a list of heads), or ``auxiliary_head.`` (one head, a dict in mmseg)."""
    ks = _indices(keys, "auxiliary_head.")
    if ks:
        if ks != list(range(len(ks))):
            raise SETRConfigError(f"auxiliary heads {ks} are not numbered 0..K-1")
        return [f"auxiliary_head.{k}." for k in ks]
    return ["auxiliary_head."] if any(k.startswith("auxiliary_head.") for k in keys) else []


def _official_up(m: _Mapper, src: str, dst: str) -> dict[str, Any]:
    """Official ``VisionTransformerUpHead``: ``conv_0..conv_n`` (the last one is the classifier), ``syncbn_fc_i``."""
    convs = _indices(list(m.sd), f"{src}conv_")
    n = len(convs)
    if convs != list(range(n)) or n not in (2, 5):
        raise SETRConfigError(f"{m.where}: {src}conv_{convs}: the official up head has 2 (Naive, auxiliary) or 5 (PUP) "
                              "convolutions")
    m.ln(f"{src}norm", f"{dst}norm")
    for j in range(n - 1):
        m.conv(f"{src}conv_{j}", f"{dst}stages.{j}.0")
        m.bn(f"{src}syncbn_fc_{j}", f"{dst}stages.{j}.1")
    m.conv(f"{src}conv_{n - 1}", f"{dst}cls")
    kernel = int(m.get(f"{src}conv_0.weight").shape[-1])
    if n == 5:
        up = [2, 2, 2, 1]  # num_conv=4, num_upsampe_layer=4: the last x2 is on the logits (the model's resize)
    else:
        up = [4] if kernel == 3 else [1]  # conv3x3_conv1x1 (PUP aux, num_upsampe_layer=2) / Naive (one resize)
    return {"type": "up", "channels": int(m.get(f"{src}conv_0.weight").shape[0]), "kernel_size": kernel,
            "up_scales": up, "conv_bias": m.has(f"{src}conv_0.bias")}


def _mmseg_up(m: _Mapper, src: str, dst: str) -> dict[str, Any]:
    """mmseg ``SETRUPHead``: ``norm``, ``up_convs.J.0.conv/bn`` (ConvModule) + Upsample, ``conv_seg``."""
    stages = _indices(list(m.sd), f"{src}up_convs.")
    if not stages or stages != list(range(len(stages))):
        raise SETRConfigError(f"{m.where}: {src}up_convs: no conv stages numbered 0..J-1")
    m.ln(f"{src}norm", f"{dst}norm")
    for j in stages:
        m.conv(f"{src}up_convs.{j}.0.conv", f"{dst}stages.{j}.0")
        m.bn(f"{src}up_convs.{j}.0.bn", f"{dst}stages.{j}.1")
    m.conv(f"{src}conv_seg", f"{dst}cls")
    first = m.get(f"{src}up_convs.0.0.conv.weight")
    scale = 2 if len(stages) == 4 else 4  # the released configs: PUP decode up_scale=2, every other SETRUPHead 4
    return {"type": "up", "channels": int(first.shape[0]), "kernel_size": int(first.shape[-1]),
            "up_scales": [scale] * len(stages), "conv_bias": m.has(f"{src}up_convs.0.0.conv.bias")}


def _same(specs: list[dict[str, Any]], where: str) -> dict[str, Any]:
    if any(s != specs[0] for s in specs[1:]):
        raise SETRConfigError(f"{where}: the auxiliary heads differ in structure ({specs[0]} vs "
                              f"{next(s for s in specs if s != specs[0])}); one structure for all is supported")
    return specs[0]


def _out_indices(out_indices: Sequence[int] | None, depth: int, family: str) -> list[int]:
    if out_indices is None:
        from setr.models.encoders import arch_of, out_indices_of

        if depth != arch_of("vit_large_patch16").depth:  # the released configs' blocks are those of ViT-L's table row
            hint = (" (released depth-12 configs: Naive 2,5,8,11; PUP-DeiT 4,7,9,11; MLA 2,5,8,11)"
                    if depth == 12 else "")
            raise SETRConfigError(f"--out-indices: the heads' blocks of a {depth}-block ViT are not in the weights; "
                                  f"pass --out-indices a,b,c,d (0-based, auxiliary heads' blocks first){hint}")
        return out_indices_of("vit_large_patch16", family)
    blocks = [int(i) for i in out_indices]
    if not blocks or any(not 0 <= b < depth for b in blocks) or any(b <= a for a, b in itertools.pairwise(blocks)):
        raise SETRConfigError(f"--out-indices: {','.join(map(str, blocks))}: expected increasing 0-based blocks of "
                              f"the {depth}-block ViT")
    return blocks


def convert_state_dict(sd: Mapping[str, torch.Tensor], *, num_heads: int | None = None,
                       out_indices: Sequence[int] | None = None, where: str = "checkpoint") -> Converted:
    """A released SETR state dict (official or mmseg layout, see the module docstring) -> :class:`Converted`.

    ``num_heads``: attention heads (default from the width: 1024 -> 16, 768 -> 12). ``out_indices``: the 0-based
    blocks the heads read, mmseg's meaning: auxiliary heads' blocks first, the decode head's last (Naive / PUP), the
    four neck levels (MLA); default the released configs' at depth 24. Raises :class:`SETRConfigError` (one line)
    for an unknown layout, a missing weight, a weight left over or a value that does not fit.
    """
    sd = strip_module_prefix(sd)
    layout = detect_layout(sd)
    if layout is None:
        raise SETRConfigError(f"{where}: not a released SETR checkpoint (expected the official fudan-zvg/SETR or "
                              "mmsegmentation keys: backbone.blocks/layers.N, decode_head.conv_0/mlahead/up_convs)")
    sd = {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}
    keys = list(sd)
    m = _Mapper(sd, where)
    enc = _encoder(m, "blocks" if any(k.startswith("backbone.blocks.") for k in keys) else "layers", num_heads)
    is_mla = any(k.startswith(("decode_head.mlahead.", "backbone.mla.", "neck.mla.")) for k in keys)
    family = "mla" if is_mla else "up"
    blocks = _out_indices(out_indices, enc["depth"], family)
    n_feeds = len(blocks)
    aux_prefixes = _aux_prefixes(keys)
    neck: dict[str, Any] | None = None
    aux: dict[str, Any] | None = None
    if is_mla:
        if layout == OFFICIAL:
            levels = _indices(keys, "backbone.norm_")
            for i in levels:
                m.ln(f"backbone.norm_{i}", f"neck.norms.{i}")
                m.conv(f"backbone.mla.mla_p{i + 2}_1x1.0", f"neck.proj.{i}.0")
                m.bn(f"backbone.mla.mla_p{i + 2}_1x1.1", f"neck.proj.{i}.1")
                m.conv(f"backbone.mla.mla_p{i + 2}.0", f"neck.fuse.{i}.0")  # official: fuse[i] on level i's sum
                m.bn(f"backbone.mla.mla_p{i + 2}.1", f"neck.fuse.{i}.1")
            branches = [x - 2 for x in _indices(keys, "decode_head.mlahead.head")]
            for k in branches:
                for s, d in (("0", "0.0"), ("1", "0.1"), ("3", "1.0"), ("4", "1.1")):
                    src, dst = f"decode_head.mlahead.head{k + 2}.{s}", f"decode_head.branches.{k}.{d}"
                    (m.bn if s in "14" else m.conv)(src, dst)
            m.conv("decode_head.cls", "decode_head.cls")
            cls = m.get("decode_head.cls.weight")
            decode = {"type": "mla", "channels": int(m.get("decode_head.mlahead.head2.0.weight").shape[0]),
                      "align_corners": True, "cls_kernel": int(cls.shape[-1]), "up_scale": 4}
            neck = {"type": "mla", "channels": int(m.get("backbone.mla.mla_p2_1x1.0.weight").shape[0])}
            specs = []
            for p in aux_prefixes:
                if m.has(f"{p}aux_0.weight"):
                    raise SETRConfigError(f"{where}: {p}aux_0: the MLA auxiliary head on ViT maps (in_channels 1024) "
                                          "is in no released config; unsupported")
                m.conv(f"{p}aux", f"auxiliary_heads.{aux_prefixes.index(p)}.cls")
                specs.append({"type": "linear", "bias": m.has(f"{p}aux.bias")})
        else:
            levels = _indices(keys, "neck.norm.")
            for i in levels:
                m.ln(f"neck.norm.{i}", f"neck.norms.{i}")
                m.conv(f"neck.mla.channel_proj.{i}.conv", f"neck.proj.{i}.0")
                m.bn(f"neck.mla.channel_proj.{i}.bn", f"neck.proj.{i}.1")
                m.conv(f"neck.mla.feat_extract.{i}.conv", f"neck.fuse.{i}.0")  # deepest_first: fuse[k] = feat_extract.k
                m.bn(f"neck.mla.feat_extract.{i}.bn", f"neck.fuse.{i}.1")
            branches = _indices(keys, "decode_head.up_convs.")
            for k in branches:
                for j in (0, 1):
                    m.conv(f"decode_head.up_convs.{k}.{j}.conv", f"decode_head.branches.{k}.{j}.0")
                    m.bn(f"decode_head.up_convs.{k}.{j}.bn", f"decode_head.branches.{k}.{j}.1")
            m.conv("decode_head.conv_seg", "decode_head.cls")
            cls = m.get("decode_head.conv_seg.weight")
            decode = {"type": "mla", "channels": int(m.get("decode_head.up_convs.0.0.conv.weight").shape[0]),
                      "align_corners": False, "cls_kernel": int(cls.shape[-1]), "up_scale": 4}
            neck = {"type": "mla", "channels": int(m.get("neck.mla.channel_proj.0.conv.weight").shape[0]),
                    "deepest_first": True}
            specs = []
            for p in aux_prefixes:
                if any(k.startswith(f"{p}convs.") for k in keys):
                    raise SETRConfigError(f"{where}: {p}convs: an MLA auxiliary FCNHead with conv layers is in no "
                                          "released config; unsupported")
                m.conv(f"{p}conv_seg", f"auxiliary_heads.{aux_prefixes.index(p)}.cls")
                specs.append({"type": "linear", "bias": m.has(f"{p}conv_seg.bias")})
        if len(levels) != n_feeds or len(branches) != n_feeds:
            raise SETRConfigError(f"--out-indices: the MLA neck has {len(levels)} levels and the head {len(branches)} "
                                  f"branches, but {n_feeds} blocks were given ({','.join(map(str, blocks))})")
        decode["in_index"] = list(range(n_feeds))
        if specs:
            if len(specs) > n_feeds:
                raise SETRConfigError(f"{where}: {len(specs)} MLA auxiliary heads for {n_feeds} neck levels")
            aux = {**_same(specs, where), "in_index": list(range(len(specs))), "loss_weight": 0.4}
        name = "mla"
    else:
        if layout == OFFICIAL:
            decode = _official_up(m, "decode_head.", "decode_head.")
            specs = [_official_up(m, p, f"auxiliary_heads.{i}.") for i, p in enumerate(aux_prefixes)]
        else:
            decode = _mmseg_up(m, "decode_head.", "decode_head.")
            specs = [_mmseg_up(m, p, f"auxiliary_heads.{i}.") for i, p in enumerate(aux_prefixes)]
        decode["in_index"] = n_feeds - 1
        if specs:
            k = len(specs)
            if k not in (n_feeds - 1, n_feeds):
                raise SETRConfigError(
                    f"--out-indices: {k} auxiliary heads need {k + 1} blocks (theirs, then the decode head's) or {k} "
                    f"(the last shared with the decode head); got {n_feeds}: {','.join(map(str, blocks))}")
            aux = {**_same(specs, where), "in_index": list(range(k)), "loss_weight": 0.4}
        name = "pup" if len(decode["up_scales"]) == 4 else "naive"
    num_classes = int(m.out["decode_head.cls.weight"].shape[0])
    if layout == MMSEG:
        name += "_mmseg"
    dropped = sorted(k for k in keys if k not in m.used)
    # the official heads' conv_seg: BaseDecodeHead's classifier, never called by them (fudan-zvg/SETR
    # mmseg/models/decode_heads/vit_up_head.py, vit_mla_head.py, vit_mla_auxi_head.py)
    unused = re.compile(r"(decode_head|auxiliary_head(\.\d+)?)\.conv_seg\.(weight|bias)")
    unknown = [k for k in dropped if layout == MMSEG or not unused.fullmatch(k)]
    if unknown:
        raise SETRConfigError(f"{where}: {len(unknown)} weight(s) of no known SETR module, e.g. {unknown[0]} "
                              f"({layout} layout)")
    encoder = {"name": enc["name"], "img_size": enc["crop"], "drop_prefix_tokens": is_mla,
               "pos_embed_interp": "bilinear", "drop_rate": 0.0, "attn_drop_rate": 0.0, "drop_path_rate": 0.0,
               "arch": enc["arch"], "pretrained": None, "grad_checkpointing": False, "out_indices": blocks,
               "patch_bias": enc["patch_bias"]}
    model = {"encoder": encoder, "head": {"name": name, "neck": neck, "decode": decode, "auxiliary": aux},
             "num_classes": num_classes, "norm": "bn"}
    return Converted(model=model, state_dict=m.out, layout=layout, head=name, embed_dim=enc["embed_dim"],
                     depth=enc["depth"], num_heads=enc["num_heads"], crop=enc["crop"], num_classes=num_classes,
                     out_indices=blocks, aux_heads=len(specs), mapped=len(m.out), dropped=dropped)


def is_released(obj: Any) -> bool:
    """True for a loaded official / mmseg SETR checkpoint (not one of this project's)."""
    if not isinstance(obj, Mapping) or "record" in (obj.get("hyper_parameters") or {}):
        return False
    sd = obj.get("state_dict") if isinstance(obj.get("state_dict"), Mapping) else obj
    return detect_layout(strip_module_prefix(sd)) is not None
