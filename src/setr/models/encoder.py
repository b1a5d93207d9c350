"""ViT encoder for SETR, built by timm (never a hand-copied ViT).

The encoder runs timm's patch embedding and transformer blocks itself so that it can

* take any input size: the learned position embeddings are resampled (bilinear by default, as the official
  SETR code does when it loads weights) whenever the token grid differs from the grid it was built for;
* drop the prefix tokens before the first block (SETR-MLA) or keep them through the blocks (Naive / PUP);
* return the raw outputs of the blocks listed in ``out_indices`` (mmsegmentation's name: 0-based block ids,
  increasing) as NCHW maps ``(B, C, H/16, W/16)``; heads address these maps by position (their ``in_index``).

There is no final norm, as in the official backbone: each head (or the MLA neck) applies its own LayerNorm.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Sequence
from pathlib import Path

import timm
import torch
from timm.layers import resample_abs_pos_embed
from torch import nn

from setr.errors import SETRConfigError
from setr.models.encoders import spec_of
from setr.models.pretrained import (  # noqa: F401  (load_state_dict_file: re-exported)
    CLASSIFIER_PREFIXES,
    load_state_dict_file,
    pretrained_path,
    read_weights,
)
from setr.values import size_pair

log = logging.getLogger("setr")


def is_tracing() -> bool:
    """True inside ``torch.jit.trace``, the ONNX exporters and ``torch.export``. Tracers record one branch of a
    Python ``if`` on shapes, so size-dependent steps (position-embedding resampling, padding) must then run
    unconditionally for the exported graph to work at every input size."""
    return torch.jit.is_tracing() or torch.compiler.is_exporting() or torch.onnx.is_in_onnx_export()


def pad_to_patch(x: torch.Tensor, patch: int) -> torch.Tensor:
    """Zero-pad ``(..., H, W)`` at the bottom / right to multiples of ``patch`` (what :class:`setr.models.SETR`
    does before the encoder). A no-op at such sizes, except while traced, when the pad stays in the graph so
    the exported model pads other sizes too."""
    h, w = x.shape[-2:]
    pad_h, pad_w = (patch - h % patch) % patch, (patch - w % patch) % patch
    if is_tracing() or pad_h or pad_w:
        x = nn.functional.pad(x, (0, pad_w, 0, pad_h))
    return x


def resample_pos_grid(pos: torch.Tensor, old: tuple[int, int], new: tuple[int, int], num_prefix: int,
                      mode: str = "bilinear") -> torch.Tensor:
    """Resample the patch part of position embeddings ``(1, num_prefix + oh*ow, C)`` to a ``new`` grid, as
    ``timm.layers.resample_abs_pos_embed`` (no antialias) but without its same-size shortcut, so a tracer records
    it; at the same size bilinear/bicubic interpolation is an exact identity."""
    prefix, grid = pos[:, :num_prefix], pos[:, num_prefix:]
    c = grid.shape[-1]
    grid = grid.reshape(1, old[0], old[1], c).permute(0, 3, 1, 2).float()
    grid = nn.functional.interpolate(grid, size=new, mode=mode, antialias=False)
    grid = grid.permute(0, 2, 3, 1).reshape(1, -1, c).to(pos.dtype)
    return torch.cat([prefix, grid], dim=1)


ARCH_OVERRIDES = ("embed_dim", "depth", "num_heads", "mlp_ratio")


class ViTEncoder(nn.Module):
    """A timm ``VisionTransformer`` that returns chosen block outputs as feature maps.

    Args:
        name: a key of :data:`setr.models.encoders.ENCODERS`.
        img_size: the input size the position embeddings are built for (the training crop).
        drop_prefix_tokens: drop cls (and distillation) tokens before the first block (official SETR-MLA).
        pos_embed_interp: interpolation used when the token grid differs from the built one.
        drop_rate, attn_drop_rate, drop_path_rate: regularisation (all 0 in the released SETR configs).
        arch: optional overrides of the architecture (``embed_dim``, ``depth``, ``num_heads``, ``mlp_ratio``),
            e.g. for tiny test models.
        pretrained: a local ImageNet ViT weights file (see :meth:`load_pretrained`), or None / ``none``.
        grad_checkpointing: recompute block activations in the backward pass to save memory (training only):
            false, true (every block) or an integer ``k``: every k-th block (0-based blocks ``0, k, 2k, ...``;
            ``ceil(depth / k)`` blocks; 1 = true, 0 = false).
        fused_attn: attention through ``torch.nn.functional.scaled_dot_product_attention`` (timm's fused path,
            flash / memory-efficient kernels) in every block; false: timm's math path (``softmax(q k^T) v``,
            the benchmark's baseline). Same result within float rounding.
        out_indices: the blocks whose outputs :meth:`forward` returns, 0-based (negative counts from the end),
            increasing, as mmsegmentation's ``VisionTransformer(out_indices=...)``: SETR-Naive/PUP (9, 14, 19, 23)
            (auxiliary heads' blocks first, the decode head's last), SETR-MLA (5, 11, 17, 23) (the neck levels).
            Default: the last block, as mmseg's ``-1``.
        freeze: no gradient for any of the ViT's parameters (``model.encoder.freeze``: fine-tune the neck and heads
            only; the optimizer then has no group for them).
        patch_bias: a bias in the patch-embedding convolution (timm and the official SETR: yes; mmsegmentation's
            ViT: no).
    """

    def __init__(
        self,
        name: str = "vit_large_patch16",
        img_size: int | Sequence[int] = 512,
        drop_prefix_tokens: bool = False,
        pos_embed_interp: str = "bilinear",
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        arch: dict | None = None,
        pretrained: str | None = None,
        grad_checkpointing: bool | int = False,
        fused_attn: bool = True,
        out_indices: int | Sequence[int] = (-1,),
        patch_bias: bool = True,
        freeze: bool = False,
    ) -> None:
        super().__init__()
        timm_arch = spec_of(name).timm_name
        arch = dict(arch or {})
        unknown = set(arch) - set(ARCH_OVERRIDES)
        if unknown:
            raise SETRConfigError(
                f"model.encoder.arch: unknown key(s) {sorted(unknown)}; allowed: {', '.join(ARCH_OVERRIDES)}"
            )
        img_size = size_pair(img_size, "model.encoder.img_size")
        self.vit = timm.create_model(
            timm_arch,
            pretrained=False,  # weights only ever come from local files (see load_pretrained)
            img_size=img_size,
            num_classes=0,
            # no pooling or classifier is ever run; DeiT's distilled model insists on its own 'token' pooling
            **({} if "distilled" in timm_arch else {"global_pool": ""}),
            drop_rate=drop_rate,
            attn_drop_rate=attn_drop_rate,
            drop_path_rate=drop_path_rate,
            dynamic_img_size=True,
            **arch,
        )
        # the official SETR backbone has no final norm: heads and the MLA neck bring their own LayerNorms
        self.vit.norm = nn.Identity()
        self.vit.fc_norm = nn.Identity()
        self.vit.head_drop = nn.Identity()
        if not patch_bias:
            self.vit.patch_embed.proj.bias = None
        self.name = name
        self.patch_size = self.vit.patch_embed.patch_size[0]
        self.embed_dim = self.vit.embed_dim
        self.depth = len(self.vit.blocks)
        self.num_prefix_tokens = self.vit.num_prefix_tokens
        self.grid_size = tuple(self.vit.patch_embed.grid_size)
        self.rope = getattr(self.vit, "rope", None)  # Eva family (EVA-02, DINOv3): rotary position embeddings
        self.drop_prefix_tokens = drop_prefix_tokens
        if drop_prefix_tokens:  # RoPE attention skips the prefix tokens: none are left
            for block in self.vit.blocks:
                if hasattr(getattr(block, "attn", None), "num_prefix_tokens"):
                    block.attn.num_prefix_tokens = 0
        self.pos_embed_interp = pos_embed_interp
        self.grad_checkpointing = grad_checkpointing
        self.set_fused_attn(fused_attn)
        self.out_indices: list[int] = []
        self.set_out_indices(out_indices)
        if drop_prefix_tokens:
            # kept so checkpoints load, but dead: they are dropped before the first block, so never trained
            for attr in ("cls_token", "dist_token", "reg_token"):
                t = getattr(self.vit, attr, None)
                if t is not None:
                    t.requires_grad_(False)
        if pretrained_path(pretrained) is not None:
            self.load_pretrained(pretrained)
        if not isinstance(freeze, bool):
            raise SETRConfigError(f"model.encoder.freeze: expected true or false, got {freeze!r}")
        if freeze:
            self.requires_grad_(False)

    # ------------------------------------------------------------------ forward
    def _prefix_tokens(self, batch: int) -> list[torch.Tensor]:
        tokens = []
        for attr in ("cls_token", "dist_token", "reg_token"):
            t = getattr(self.vit, attr, None)
            if t is not None:
                tokens.append(t.expand(batch, -1, -1))
        return tokens

    def _pos_embed(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x: (B, h, w, C) patch embeddings -> ((B, prefix + h*w, C) with prefix tokens and absolute position
        embeddings, the rotary embeddings of the ``h x w`` grid or None). The absolute table (when the encoder has
        one) is resampled to the grid; rotary embeddings are computed for it."""
        b, h, w, c = x.shape
        pos = getattr(self.vit, "pos_embed", None)
        embed_prefix = 0 if self.vit.no_embed_class else self.num_prefix_tokens
        if pos is not None and (is_tracing() or (h, w) != self.grid_size):
            pos = resample_pos_grid(pos, self.grid_size, (h, w), embed_prefix, self.pos_embed_interp)
        x = x.reshape(b, h * w, c)
        prefix = self._prefix_tokens(b)
        if pos is None:
            x = torch.cat([*prefix, x], dim=1)
        elif self.vit.no_embed_class:
            x = x + pos
            x = torch.cat([*prefix, x], dim=1)
        else:
            x = torch.cat([*prefix, x], dim=1) + pos
        rope = self.rope.get_embed(shape=[h, w]) if self.rope is not None else None
        return self.vit.pos_drop(x), rope

    def forward(self, x: torch.Tensor, out_indices: Sequence[int] | None = None) -> list[torch.Tensor]:
        """Return the outputs of blocks :attr:`out_indices` as NCHW maps, in that order. Blocks after the last
        one listed do not run.

        ``out_indices`` overrides the list for this call (0-based, negative counts from the end), e.g. to stop at
        an early block for attention maps. The input height and width must be multiples of the patch size
        (:class:`setr.models.SETR` pads).
        """
        idx = self.out_indices if out_indices is None else [self.resolve_block(i) for i in out_indices]
        if x.shape[-2] % self.patch_size or x.shape[-1] % self.patch_size:
            raise ValueError(f"input size {tuple(x.shape[-2:])} is not a multiple of the patch size {self.patch_size}")
        tokens = self.vit.patch_embed(x)  # (B, h, w, C) because dynamic_img_size=True
        b, h, w, c = tokens.shape
        tokens, rope = self._pos_embed(tokens)
        extra = () if rope is None else (rope,)  # Eva blocks take the rotary embeddings: block(x, rope)
        for step in (getattr(self.vit, "patch_drop", None), getattr(self.vit, "norm_pre", None)):
            if step is not None:  # Eva has no patch dropout module when it is off
                tokens = step(tokens)
        n_prefix = self.num_prefix_tokens
        if self.drop_prefix_tokens:
            tokens = tokens[:, n_prefix:]
            n_prefix = 0
        wanted: dict[int, torch.Tensor | None] = dict.fromkeys(idx)
        last = max(idx)
        for i, block in enumerate(self.vit.blocks):
            if i in self._checkpointed and self.training and torch.is_grad_enabled():
                tokens = torch.utils.checkpoint.checkpoint(block, tokens, *extra, use_reentrant=False)
            else:
                tokens = block(tokens, *extra)
            if i in wanted:
                wanted[i] = tokens[:, n_prefix:].reshape(b, h, w, c).permute(0, 3, 1, 2)
            if i == last:
                break
        return [wanted[i] for i in idx]

    @property
    def grad_checkpointing(self) -> bool | int:
        """false, true or k (checkpoint every k-th block); setting it validates and picks the blocks."""
        return self._grad_checkpointing

    @grad_checkpointing.setter
    def grad_checkpointing(self, value: bool | int) -> None:
        if isinstance(value, bool):
            every = int(value)
        elif isinstance(value, int) and value >= 0:
            every = value
        else:
            raise SETRConfigError(f"model.encoder.grad_checkpointing: expected false, true or a block interval k >= 0 "
                                  f"(checkpoint every k-th block), got {value!r}")
        self._grad_checkpointing = value
        self._checkpointed = frozenset(range(0, self.depth, every)) if every else frozenset()

    @property
    def checkpointed_blocks(self) -> list[int]:
        """0-based ids of the blocks whose activations are recomputed in the backward pass (training only)."""
        return sorted(self._checkpointed)

    def set_fused_attn(self, fused: bool) -> None:
        """Switch every block's attention between the fused kernel (``scaled_dot_product_attention``) and timm's
        math path (``model.encoder.fused_attn``)."""
        if not isinstance(fused, bool):
            raise SETRConfigError(f"model.encoder.fused_attn: expected true or false, got {fused!r}")
        for block in self.vit.blocks:
            attn = getattr(block, "attn", None)
            if attn is not None and hasattr(attn, "fused_attn"):
                attn.fused_attn = fused
        self.fused_attn = fused

    def resolve_block(self, i: int, key: str | None = None) -> int:
        """0-based block id of ``i`` (negative counts from the end); ``key`` names the config entry in errors."""
        where = f"{key}: " if key else ""
        if not isinstance(i, int) or isinstance(i, bool):
            raise SETRConfigError(f"{where}a block is an integer, got {i!r}")
        j = i + self.depth if i < 0 else i
        if not 0 <= j < self.depth:
            raise SETRConfigError(
                f"{where}block {i} is out of range for encoder {self.name!r} with {self.depth} blocks "
                f"(use 0..{self.depth - 1} or negative ids)"
            )
        return j

    def set_out_indices(self, out_indices: int | Sequence[int], key: str = "model.encoder.out_indices") -> None:
        """Validate and store :attr:`out_indices` as 0-based ids. They must increase: mmsegmentation returns the
        maps in block order whatever order the list has, so an unordered list would silently shift the positions
        the heads' ``in_index`` name."""
        if isinstance(out_indices, int) and not isinstance(out_indices, bool):
            out_indices = [out_indices]
        if isinstance(out_indices, (str, bytes)) or not isinstance(out_indices, Sequence) or not out_indices:
            raise SETRConfigError(f"{key}: at least one block is needed (0-based ids), got {out_indices!r}")
        blocks = [self.resolve_block(i, key) for i in out_indices]
        if any(b <= a for a, b in itertools.pairwise(blocks)):
            raise SETRConfigError(f"{key}: blocks must be increasing (each listed once), got {list(out_indices)}")
        self.out_indices = blocks

    # ---------------------------------------------------------------- weights
    def load_pretrained(self, path: str | Path | None) -> dict[str, list[str]]:
        """Load local pretrained weights, resampling position embeddings to this encoder's grid.

        Files (:mod:`setr.models.pretrained`): timm ``.pth``/``.pt``/``.bin`` (plain, or under ``state_dict`` /
        ``model`` / ``module``, with or without a ``backbone.`` / ``module.`` prefix), ``.safetensors`` or a folder
        holding ``model.safetensors`` (a timm / Hugging Face hub snapshot), the original releases of DINOv2, DINOv3,
        EVA-02 and DeiT-III (mapped by timm's own checkpoint filter of the encoder's class), the original ViT
        ``.npz`` and mmsegmentation's converted ViT; never arbitrary unpickling. A torch-hub hash in the file name is
        checked. The classifier (``head``, ``head_dist``, ``pre_logits``, ``lm_head``...) and final norm are dropped
        (SETR uses neither); position embeddings are resampled with :attr:`pos_embed_interp` (never by timm's
        filter); one log line sums up what was loaded. ``none`` / None loads nothing.

        Returns the missing and unexpected keys; a file of another encoder (patch size, width, prefix tokens,
        missing encoder weights) raises :class:`SETRConfigError` naming the file.
        """
        from setr.models.pretrained import to_model_layout

        file = pretrained_path(path)
        if file is None:
            return {"missing": [], "unexpected": []}
        weights = read_weights(file)
        file = weights.path or file
        dropped = list(weights.dropped) + [k for k in weights.state if k.startswith(CLASSIFIER_PREFIXES)]
        weights.state = {k: v for k, v in weights.state.items() if not k.startswith(CLASSIFIER_PREFIXES)}
        self._check_patch_kernel(file, weights.state)
        weights = to_model_layout(weights, self.vit)
        state = weights.state
        dropped += [k for k in weights.dropped if k not in dropped]
        what = f"{weights.fmt}, {weights.layout}"
        pos_note = ""
        if "pos_embed" in state:
            pe = state["pos_embed"]
            embed_prefix = 0 if self.vit.no_embed_class else self.num_prefix_tokens
            n_old = pe.shape[1] - embed_prefix
            side = round(n_old**0.5)
            if pe.ndim != 3 or side * side != n_old:
                raise SETRConfigError(f"{file}: pos_embed {tuple(pe.shape)} has {n_old} patch positions after "
                                      f"{embed_prefix} prefix token(s), not a square grid: weights of another encoder?"
                                      f"{self._other_encoder_hint(file)}")
            new = "x".join(map(str, self.grid_size))
            pos_note = f"pos_embed {side}x{side}" + (f" -> {new}" if (side, side) != self.grid_size else " (kept)")
            if (side, side) != self.grid_size:
                state["pos_embed"] = resample_abs_pos_embed(
                    pe.float(),
                    new_size=self.grid_size,
                    old_size=(side, side),
                    num_prefix_tokens=embed_prefix,
                    interpolation=self.pos_embed_interp,
                    antialias=False,
                ).to(pe.dtype)
        own = self.vit.state_dict()
        missing = [k for k in own if k not in state]
        if missing:  # before the shapes: names of another family say more than its shapes
            raise SETRConfigError(f"{file}: checkpoint lacks {len(missing)} encoder weights, e.g. {missing[:3]} "
                                  f"({what} file){self._other_encoder_hint(file)}")
        bad = [f"{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}" for k, v in state.items()
               if k in own and own[k].shape != v.shape]
        if bad:
            raise SETRConfigError(f"{file}: weights do not fit encoder {self.name!r}: " + "; ".join(bad[:3])
                                  + self._other_encoder_hint(file))
        result = self.vit.load_state_dict(state, strict=False)
        unexpected = list(result.unexpected_keys)
        loaded = sum(1 for k in state if k in own)
        log.info("pretrained %s: %s, %d tensors loaded, %s, dropped: %s; missing: none; unexpected: %s",
                 file, what, loaded, pos_note or "no pos_embed", _names(sorted(dropped)), _names(unexpected))
        return {"missing": [], "unexpected": unexpected}

    def _check_patch_kernel(self, file: Path, state: dict[str, torch.Tensor]) -> None:
        """A patch embedding of another size means weights of another encoder: timm's filter would resample it
        silently, so it stops here with one line."""
        kernel = state.get("patch_embed.proj.weight")
        if kernel is not None and kernel.ndim == 4 and tuple(kernel.shape[-2:]) != (self.patch_size, self.patch_size):
            raise SETRConfigError(
                f"{file}: patch embedding {kernel.shape[-2]}x{kernel.shape[-1]} vs patch size {self.patch_size} of "
                f"encoder {self.name!r}: weights of another encoder{self._other_encoder_hint(file)}")

    def _other_encoder_hint(self, file: Path) -> str:
        """'; <file> is the released file of <encoder>: set model.encoder.name=<encoder>' for a file of the
        encoder table that belongs to another encoder, else ''."""
        from setr.models.encoders import known_file

        found = known_file(file.name)
        if found is None or found[0] == self.name:
            return ""
        return f"; {file.name} is the released file of {found[0]}: set model.encoder.name={found[0]}"

def _names(keys: Sequence[str], limit: int = 8) -> str:
    if not keys:
        return "none"
    more = f" (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more
