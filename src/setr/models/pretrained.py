"""ImageNet-pretrained ViT weights: where the released files come from, and the readers of every supported layout.

Nothing is ever downloaded: ``model.encoder.pretrained`` names a local file, or a folder holding ``model.safetensors``
(a timm / Hugging Face hub snapshot), or ``none`` to train from scratch; the presets name the released file under
``paths.weights_dir``. The readers never unpickle arbitrary objects (every torch / safetensors file is read by
:mod:`setr.files`; ``numpy.load(allow_pickle=False)``) and turn every file into a flat state dict of the encoder's
timm model (``VisionTransformer`` or ``Eva``):

* timm ``.pth`` / ``.pt`` / ``.bin`` (a plain state dict, or one under ``state_dict`` / ``model`` / ``module``, as
  DeiT's and EVA-02's releases), and ``.safetensors`` (timm's hub files: ``model.safetensors``);
* the original releases of DINOv2 (``dinov2_vit*14[_reg4]_pretrain.pth``: ``register_tokens``, ``mask_token``),
  DINOv3 (``dinov3_vit*16_pretrain_lvd1689m-*.pth``: ``storage_tokens``, ``ls1.gamma``, ``qkv.bias``), EVA-02
  (``eva02_*_pt_*_p14.pt``: ``q_bias`` / ``v_bias``, SwiGLU ``mlp.w1`` / ``w2`` / ``w3``, ``lm_head``) and DeiT-III
  (``deit_3_*_21k.pth``: ``gamma_1`` / ``gamma_2``), mapped onto timm's model by timm's own checkpoint filters
  (``timm.models.vision_transformer.checkpoint_filter_fn``, ``timm.models.eva.checkpoint_filter_fn``:
  :func:`to_model_layout`); position embeddings are resampled by the encoder, never by the filter;
* the ``.npz`` of the original ViT release (``Transformer/encoderblock_N/...``), read by timm's own ``_load_weights``
  into a timm model of the file's shape;
* mmsegmentation's converted ViT (``tools/model_converters/vit2mmseg.py``: ``layers.N.ln1``,
  ``layers.N.attn.attn.in_proj_weight``, ``ffn.layers.0.0``, ``patch_embed.projection``, final norm ``ln1``),
  with or without a ``backbone.`` prefix (then keys outside the backbone are dropped).

A file name with a torch-hub hash suffix (``name-<8+ hex>.pth``, as the released files) must have a sha256 that
starts with it: a truncated or corrupt download stops the run with one line.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from setr.errors import SETRConfigError
from setr.files import read_safetensors_file, read_torch_file
from setr.models.encoders import ENCODERS, default_weights

KEY = "model.encoder.pretrained"
NO_WEIGHTS = ("", "none", "null")
# the weights file of a timm / Hugging Face hub snapshot folder
HUB_FILE = "model.safetensors"


@dataclass(frozen=True)
class WeightsSource:
    timm_name: str
    what: str
    url: str


def _known() -> dict[str, WeightsSource]:
    return {w.name: WeightsSource(spec.timm_name, w.what, w.url) for spec in ENCODERS.values() for w in spec.weights}


# the released weight files of the encoder table (setr.models.encoders), by file name
KNOWN_WEIGHTS: dict[str, WeightsSource] = _known()


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
    """'download <url> (timm <name>: <what>)' for a released file of the encoder table, else a generic hint."""
    name = path.name if path is not None else None
    if name not in KNOWN_WEIGHTS and encoder in ENCODERS and default_weights(encoder) is not None:
        name = default_weights(encoder).name
        src = KNOWN_WEIGHTS[name]
        return f"the released file for {encoder} is {name}: {src.url} (timm {src.timm_name})"
    if name in KNOWN_WEIGHTS:
        src = KNOWN_WEIGHTS[name]
        return f"download {src.url} (timm {src.timm_name}: {src.what})"
    return (f"point it at a local ViT weights file (.pth, .pt, .bin, .safetensors, .npz) or a folder holding "
            f"{HUB_FILE}")


def weights_file(path: Path) -> Path:
    """The file a ``pretrained`` path names: the path itself, or the ``model.safetensors`` of a folder (a timm /
    Hugging Face hub snapshot); one line naming the folder and what it holds when it has none."""
    if not path.is_dir():
        return path
    file = path / HUB_FILE
    if file.is_file():
        return file
    held = sorted(p.name for p in path.iterdir())
    listing = ", ".join(held[:6]) + (f" (+{len(held) - 6} more)" if len(held) > 6 else "") if held else "nothing"
    raise SETRConfigError(f"{KEY}: {path} is a folder without {HUB_FILE} (the timm / Hugging Face hub layout; it "
                          f"holds {listing}): name the weights file itself")


def check_pretrained_file(value: Any, encoder: str | None = None, verify: bool = True) -> Path | None:
    """Validate ``model.encoder.pretrained`` before anything is built: None for no weights; else the file (a
    folder's ``model.safetensors``), which must exist (one line naming the file, the key and where to get it) and
    match the hash in its name."""
    path = pretrained_path(value)
    if path is None:
        return None
    path = weights_file(path)
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
    """A weights file read into timm naming: ``state`` (tensors), ``fmt`` (the file format: pth, safetensors, npz)
    and ``layout`` (whose key names it has), both for the log line, the keys the reader already left out (the .npz
    classifier, a segmentor's heads) and ``path``, the file read (a folder's ``model.safetensors``)."""

    state: dict[str, torch.Tensor]
    fmt: str
    dropped: list[str]
    layout: str = "timm layout"
    path: Path | None = None


def read_weights(path: str | Path) -> Weights:
    """Read a weights file (or a hub folder's ``model.safetensors``) of any supported layout into a flat state
    dict (see the module doc); the release layouts keep their own names until :func:`to_model_layout`."""
    path = weights_file(Path(path))
    if not path.is_file():
        raise SETRConfigError(f"{path}: pretrained weights file not found; {where_to_get(path)}")
    verify_hash(path)
    if path.suffix == ".npz":
        weights = _read_npz(path)
        weights.path = path
        return weights
    state = load_state_dict_file(path)
    fmt = path.suffix.lstrip(".") or "torch"
    dropped: list[str] = []
    if any(k.startswith("backbone.") for k in state) and not all(k.startswith("backbone.") for k in state):
        dropped = sorted(k for k in state if not k.startswith("backbone."))  # a whole segmentor: its backbone only
        state = {k: v for k, v in state.items() if k.startswith("backbone.")}
    state = strip_prefixes(state, ("module.", "backbone.", "encoder.vit.", "vit."))
    if any(k.startswith("embeddings.") for k in state) and any(k.startswith("encoder.layer.") for k in state):
        raise SETRConfigError(f"{KEY}: {path} is a Hugging Face transformers checkpoint (embeddings.*, "
                              "encoder.layer.*), which timm does not read: use timm's file (a snapshot of "
                              "huggingface.co/timm/<model>) or the original release")
    layout = "timm layout"
    if is_mmseg_vit(state):
        state = from_mmseg(state)
        layout = "mmsegmentation layout"
    return Weights(state, fmt, dropped, layout, path)


# ----------------------------------------------------------------------------------- release layouts -> timm
class _FilterView:
    """The encoder's timm model as timm's checkpoint filters see it, but without ``pos_embed``: the filters then
    leave the file's position embeddings as they are (their resampling is bicubic with antialias by default); the
    encoder resamples them itself with its ``pos_embed_interp`` (SETR: bilinear, no antialias)."""

    pos_embed = None

    def __init__(self, model: torch.nn.Module) -> None:
        self._model = model

    def __getattr__(self, name: str) -> Any:
        return getattr(self._model, name)


def release_layout(keys: set[str] | dict) -> str:
    """A name for the release layout a state dict's keys show (for the log line and errors)."""
    if "storage_tokens" in keys:
        return "DINOv3 release layout"
    if "register_tokens" in keys:
        return "DINOv2 release layout (registers)"
    if any(k.endswith((".attn.q_bias", ".mlp.w1.weight", ".mlp.ffn_ln.weight")) for k in keys):
        return "EVA-02 release layout"
    if "mask_token" in keys:
        return "DINOv2 release layout"
    if any(re.fullmatch(r"blocks\.\d+\.gamma_[12]", k) for k in keys):
        return "DeiT-III release layout"
    return "release layout"


def timm_filter(model: torch.nn.Module) -> tuple[Any, dict[str, Any], str]:
    """timm's own checkpoint filter for the model's class (what ``timm.create_model(..., pretrained=True)`` runs on
    a file), its keyword arguments, and its name: ``timm.models.eva.checkpoint_filter_fn`` for ``Eva`` (EVA-02,
    DINOv3), ``timm.models.vision_transformer.checkpoint_filter_fn`` otherwise (DINOv2, DeiT-III's layer scale
    ``gamma_N`` -> ``lsN.gamma``: ``adapt_layer_scale``, as timm's deit3 models)."""
    from timm.models import eva, vision_transformer

    # interpolation / antialias only reach a patch kernel of another size, which load_pretrained refuses first
    if isinstance(model, eva.Eva):
        return eva.checkpoint_filter_fn, {"interpolation": "bilinear", "antialias": False}, \
            "timm.models.eva.checkpoint_filter_fn"
    return vision_transformer.checkpoint_filter_fn, \
        {"adapt_layer_scale": True, "interpolation": "bilinear", "antialias": False}, \
        "timm.models.vision_transformer.checkpoint_filter_fn"


def to_model_layout(weights: Weights, model: torch.nn.Module) -> Weights:
    """Map a state dict onto ``model`` (the encoder's timm model) with timm's own checkpoint filter
    (:func:`timm_filter`): the identity on timm's layout, the release layouts' keys renamed / merged as timm does
    (DINOv2: ``register_tokens`` -> ``reg_token``, the class token's position folded in; DINOv3: ``storage_tokens``,
    ``ls1.gamma`` -> ``gamma_1``, ``qkv.bias`` split; EVA-02: ``q_bias`` -> ``q_proj.bias``, ``mlp.w1`` ->
    ``fc1_g``...). Position embeddings pass unchanged (:class:`_FilterView`). File tensors the filter leaves out
    (``mask_token``, RoPE periods, ``lm_head``, a zero ``qkv.bias`` the model has no place for) join ``dropped``."""
    state = weights.state
    fn, kwargs, name = timm_filter(model)
    with contextlib.redirect_stdout(io.StringIO()):  # the DINOv3 branch prints each q_bias the model lacks
        out = fn(dict(state), _FilterView(model), **kwargs)
    if out.keys() == state.keys() and all(out[k] is state[k] for k in state):
        return weights
    kept = {t.untyped_storage().data_ptr() for t in out.values() if t.numel()}
    left = [k for k, v in state.items()
            if k not in out and (not v.numel() or v.untyped_storage().data_ptr() not in kept)]
    lost = [k for k in left if k.endswith("attn.qkv.bias") and state[k].count_nonzero()]
    if lost:  # timm's filter skips a qkv.bias the model has no q_bias / v_bias for: fine only when it is zero
        raise SETRConfigError(f"{weights.path}: {lost[0]} is not zero but the encoder's attention has no bias "
                              f"(non-zero in {len(lost)} block(s)): weights of another variant of the encoder")
    layout = f"{release_layout(state)}, mapped by {name}"
    return Weights(dict(out), weights.fmt, list(weights.dropped) + left, layout, weights.path)


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
    return Weights(state, "npz", sorted(dropped), "original ViT release")
