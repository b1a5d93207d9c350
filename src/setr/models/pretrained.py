"""ImageNet-pretrained ViT weights: where the paper's files come from, and the readers of every supported layout.

Nothing is ever downloaded: ``model.encoder.pretrained`` names a local file (the paper presets name the file the
paper used under ``paths.weights_dir``), or ``none`` to train from scratch. The readers never unpickle arbitrary
objects (``torch.load(weights_only=True)``, safetensors, ``numpy.load(allow_pickle=False)``) and turn every file
into a flat state dict in timm's ``VisionTransformer`` naming:

* timm ``.pth`` / ``.pt`` / ``.bin`` (a plain state dict, or one under ``state_dict`` / ``model``, as DeiT's), and
  ``.safetensors``;
* the ``.npz`` of the original ViT release (``Transformer/encoderblock_N/...``), read by timm's own ``_load_weights``
  into a timm model of the file's shape;
* mmsegmentation's converted ViT (``tools/model_converters/vit2mmseg.py``: ``layers.N.ln1``,
  ``layers.N.attn.attn.in_proj_weight``, ``ffn.layers.0.0``, ``patch_embed.projection``, final norm ``ln1``),
  with or without a ``backbone.`` prefix (then keys outside the backbone are dropped).

A file name with a torch-hub hash suffix (``name-<8+ hex>.pth``, as the released files) must have a sha256 that
starts with it: a truncated or corrupt download stops the run with one line.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from setr.errors import SETRConfigError
from setr.files import read_safetensors_file, read_torch_file

KEY = "model.encoder.pretrained"
NO_WEIGHTS = ("", "none", "null")


@dataclass(frozen=True)
class WeightsSource:
    timm_name: str
    what: str
    url: str


_JX = "https://github.com/rwightman/pytorch-image-models/releases/download/v0.1-vitjx/"
# the files the paper's rows start from: the ViT URLs of the official code's default_cfgs (github.com/fudan-zvg/SETR,
# mmseg/models/backbones/vit.py) and DeiT's release; README "Pretrained weights"
KNOWN_WEIGHTS: dict[str, WeightsSource] = {
    "jx_vit_large_p16_384-b3be5167.pth": WeightsSource(
        "vit_large_patch16_384", "ViT-L/16, ImageNet-21k pre-trained, ImageNet-1k fine-tuned at 384 px",
        _JX + "jx_vit_large_p16_384-b3be5167.pth"),
    "jx_vit_base_p16_384-83fb41ba.pth": WeightsSource(
        "vit_base_patch16_384", "ViT-B/16, ImageNet-21k pre-trained, ImageNet-1k fine-tuned at 384 px",
        _JX + "jx_vit_base_p16_384-83fb41ba.pth"),
    "deit_base_distilled_patch16_384-d0272ac0.pth": WeightsSource(
        "deit_base_distilled_patch16_384", "DeiT-B/16 distilled, ImageNet-1k at 384 px",
        "https://dl.fbaipublicfiles.com/deit/deit_base_distilled_patch16_384-d0272ac0.pth"),
}
# encoder name (model.encoder.name) -> the paper's file for it
ENCODER_WEIGHTS: dict[str, str] = {
    "vit_large_patch16": "jx_vit_large_p16_384-b3be5167.pth",
    "vit_base_patch16": "jx_vit_base_p16_384-83fb41ba.pth",
    "deit_base_distilled_patch16": "deit_base_distilled_patch16_384-d0272ac0.pth",
}

# torch.hub's convention (torch.hub.HASH_REGEX): the first hex digits of the file's sha256 before the extension
HASH_IN_NAME = re.compile(r"-([0-9a-f]{8,64})\.(?:pth|pt|bin|npz|safetensors)$")
# what SETR never uses: the classifier(s) and the final norm (the official backbone has none)
CLASSIFIER_PREFIXES = ("head.", "head_dist.", "pre_logits.", "norm.", "fc_norm.", "attn_pool.")


# ------------------------------------------------------------------------------------------------ config side
def pretrained_path(value: Any) -> Path | None:
    """The weights file a ``pretrained`` value names, or None for no weights (None, ``none``, ``null``, '')."""
    if value is None or (isinstance(value, str) and value.strip().lower() in NO_WEIGHTS):
        return None
    if isinstance(value, bool) or not isinstance(value, (str, Path)):
        raise SETRConfigError(f"{KEY}: expected a weights file or none, got {value!r}")
    return Path(value).expanduser()


def where_to_get(path: Path | None, encoder: str | None = None) -> str:
    """'download <url> (timm <name>: <what>)' for the paper's files, else a generic hint."""
    name = path.name if path is not None else None
    if name not in KNOWN_WEIGHTS and encoder in ENCODER_WEIGHTS:
        name = ENCODER_WEIGHTS[encoder]
        src = KNOWN_WEIGHTS[name]
        return f"the paper's file for {encoder} is {name}: {src.url} (timm {src.timm_name})"
    if name in KNOWN_WEIGHTS:
        src = KNOWN_WEIGHTS[name]
        return f"download {src.url} (timm {src.timm_name}: {src.what})"
    return "point it at a local ViT weights file (.pth, .bin, .safetensors, .npz)"


def check_pretrained_file(value: Any, encoder: str | None = None, verify: bool = True) -> Path | None:
    """Validate ``model.encoder.pretrained`` before anything is built: None for no weights; else the file, which
    must exist (one line naming the file, the key and where to get it) and match the hash in its name."""
    path = pretrained_path(value)
    if path is None:
        return None
    if not path.is_file():
        raise SETRConfigError(
            f"{KEY}: weights file {path} not found; {where_to_get(path, encoder)}; "
            f"or set {KEY}=none to train from scratch")
    if verify:
        verify_hash(path)
    return path


_verified: dict[tuple[str, int, int], str] = {}


def verify_hash(path: str | Path) -> str | None:
    """Check the torch-hub hash prefix in the file name against the file's sha256; returns the prefix (None when
    the name has none). Raises one line on a mismatch. Cached per (file, size, mtime) for this process."""
    path = Path(path)
    m = HASH_IN_NAME.search(path.name)
    if m is None:
        return None
    prefix = m.group(1)
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _verified:
        with open(path, "rb") as f:
            _verified[key] = hashlib.file_digest(f, "sha256").hexdigest()
    digest = _verified[key]
    if not digest.startswith(prefix):
        raise SETRConfigError(
            f"{path}: sha256 {digest[:len(prefix)]}... does not match the '{prefix}' in its name: the file is "
            f"truncated or corrupt ({st.st_size:,} bytes), download it again (a name whose -{prefix} is no hash: "
            "rename it)")
    return prefix


# ---------------------------------------------------------------------------------------------------- readers
@dataclass
class Weights:
    """A weights file read into timm naming: ``state`` (tensors), ``fmt`` (a label for the log line) and the keys
    the reader already left out (the .npz classifier, a segmentor's heads)."""

    state: dict[str, torch.Tensor]
    fmt: str
    dropped: list[str]


def read_weights(path: str | Path) -> Weights:
    """Read a weights file of any supported layout into timm ``VisionTransformer`` keys (see the module doc)."""
    path = Path(path)
    if not path.is_file():
        raise SETRConfigError(f"{path}: pretrained weights file not found; {where_to_get(path)}")
    verify_hash(path)
    if path.suffix == ".npz":
        return _read_npz(path)
    state = load_state_dict_file(path)
    fmt = path.suffix.lstrip(".") or "torch"
    dropped: list[str] = []
    if any(k.startswith("backbone.") for k in state) and not all(k.startswith("backbone.") for k in state):
        dropped = sorted(k for k in state if not k.startswith("backbone."))  # a whole segmentor: its backbone only
        state = {k: v for k, v in state.items() if k.startswith("backbone.")}
    state = strip_prefixes(state, ("module.", "backbone.", "encoder.vit.", "vit."))
    if is_mmseg_vit(state):
        state = from_mmseg(state)
        fmt += ", mmsegmentation layout"
    else:
        fmt += ", timm layout"
    return Weights(state, fmt, dropped)


def load_state_dict_file(path: str | Path, what: str = KEY) -> dict[str, torch.Tensor]:
    """Read a ``.pth`` / ``.pt`` / ``.bin`` / ``.safetensors`` file into a flat state dict of tensors through the one
    safe reader (:mod:`setr.files`: no arbitrary unpickling); one error line naming ``what`` and the file otherwise."""
    path = Path(path)
    if path.suffix == ".safetensors":
        obj: Any = read_safetensors_file(path, what, kind="weights file")[0]
    else:
        obj = read_torch_file(path, what, kind="weights file",
                              pickle_hint="re-save its tensors alone (torch.save(state_dict) or safetensors)")
    for key in ("state_dict", "model", "module"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise SETRConfigError(f"{what}: {path} is not a state dict of tensors")
    return obj


def strip_prefixes(state: dict, prefixes: tuple[str, ...]) -> dict:
    for p in prefixes:
        if state and all(k.startswith(p) for k in state):
            state = {k[len(p):]: v for k, v in state.items()}
    return state


# ------------------------------------------------------------------------------------------- mmsegmentation
_MMSEG_BLOCK = [  # vit2mmseg.py, inverted: mmseg name inside layers.N -> timm name inside blocks.N
    ("ln1.", "norm1."), ("ln2.", "norm2."),
    ("attn.attn.in_proj_weight", "attn.qkv.weight"), ("attn.attn.in_proj_bias", "attn.qkv.bias"),
    ("attn.attn.out_proj.", "attn.proj."),
    ("ffn.layers.0.0.", "mlp.fc1."), ("ffn.layers.1.", "mlp.fc2."),
]


def is_mmseg_vit(state: dict) -> bool:
    return any(k.startswith(("layers.", "patch_embed.projection.")) for k in state)


def from_mmseg(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """mmsegmentation's ``VisionTransformer`` keys (its mmseg/models/backbones/vit.py) -> timm's; q, k, v are
    stacked in the same order in both, so tensors are copied as they are. Unknown keys keep their names (reported
    unexpected)."""
    out = {}
    for k, v in state.items():
        m = re.match(r"layers\.(\d+)\.(.*)", k)
        if m:
            rest = m.group(2)
            for old, new in _MMSEG_BLOCK:
                if rest.startswith(old):
                    rest = new + rest[len(old):]
                    break
            k = f"blocks.{m.group(1)}.{rest}"
        elif k.startswith("patch_embed.projection."):
            k = "patch_embed.proj." + k[len("patch_embed.projection."):]
        elif k.startswith("ln1."):  # the final norm (final_norm=True)
            k = "norm." + k[len("ln1."):]
        out[k] = v
    return out


# ------------------------------------------------------------------------------------------------------ .npz
_NPZ_PREFIXES = ("", "opt/target/", "params/")
# keys of the original release that timm's reader does not consume, in timm naming (for the log line)
_NPZ_LEFT = {"head/kernel": "head.weight", "head/bias": "head.bias",
             "pre_logits/kernel": "pre_logits.fc.weight", "pre_logits/bias": "pre_logits.fc.bias"}


def _read_npz(path: Path) -> Weights:
    """The original ViT release (``Transformer/encoderblock_N/...``): build a timm ``VisionTransformer`` of the
    file's shape (inferred from the arrays), fill it with timm's ``_load_weights`` and take its state dict."""
    import numpy as np
    from timm.models.vision_transformer import VisionTransformer, _load_weights

    try:
        with np.load(path, allow_pickle=False) as z:
            shapes = {k: z[k].shape for k in z.files}
    except Exception as e:
        raise SETRConfigError(f"{path}: cannot read weights ({type(e).__name__}: {str(e).splitlines()[0]})") from e
    pre = next((p for p in _NPZ_PREFIXES if f"{p}embedding/kernel" in shapes), None)
    if pre is None or f"{pre}Transformer/encoderblock_0/LayerNorm_0/scale" not in shapes:
        raise SETRConfigError(f"{path}: not a ViT .npz of the original release (no embedding/kernel and "
                              "Transformer/encoderblock_0/...)")
    try:
        p, _, in_chans, dim = shapes[f"{pre}embedding/kernel"]
        blk = f"{pre}Transformer/encoderblock_0/"
        _, heads, _ = shapes[f"{blk}MultiHeadDotProductAttention_1/query/kernel"]
        hidden = shapes[f"{blk}MlpBlock_3/Dense_0/kernel"][1]
        n_pos = shapes[f"{pre}Transformer/posembed_input/pos_embedding"][1]
    except (KeyError, ValueError) as e:
        raise SETRConfigError(f"{path}: unexpected .npz layout ({type(e).__name__}: {e})") from e
    block_norm = re.compile(rf"{re.escape(pre)}Transformer/encoderblock_\d+/LayerNorm_0/scale")
    depth = sum(1 for k in shapes if block_norm.fullmatch(k))
    has_cls = f"{pre}cls" in shapes
    side = round((n_pos - has_cls) ** 0.5)
    with torch.device("meta"):
        vit = VisionTransformer(img_size=side * p, patch_size=p, in_chans=in_chans, embed_dim=dim, depth=depth,
                                num_heads=heads, mlp_ratio=hidden / dim, qkv_bias=True, num_classes=0,
                                class_token=has_cls, global_pool="token" if has_cls else "avg")
    vit = vit.to_empty(device="cpu")
    with torch.no_grad():
        for t in vit.state_dict().values():
            t.fill_(float("nan"))  # anything the file does not fill stays NaN: caught below
    try:
        _load_weights(vit, str(path), prefix=pre)
    except KeyError as e:
        raise SETRConfigError(f"{path}: the .npz lacks {e.args[0]!r}") from e
    except Exception as e:
        raise SETRConfigError(f"{path}: cannot read weights ({type(e).__name__}: {str(e).splitlines()[0]})") from e
    state = dict(vit.state_dict())
    unfilled = [k for k, v in state.items() if v.is_floating_point() and torch.isnan(v).any()]
    if unfilled:
        raise SETRConfigError(f"{path}: the .npz leaves {len(unfilled)} weights unset, e.g. {unfilled[:3]}")
    dropped = [_NPZ_LEFT.get(k[len(pre):], k) for k in shapes
               if not k[len(pre):].startswith(("Transformer/", "embedding/", "cls"))]
    return Weights(state, "npz, original ViT release", sorted(dropped))
