"""Self-attention weights of the ViT encoder, for visualisation (``notebooks/02_predict.ipynb``).

timm computes attention with ``F.scaled_dot_product_attention`` (fused) when it can, so the weights never exist
as a tensor. :func:`attention_weights` hooks the chosen blocks' ``attn`` modules and recomputes
``softmax(q k^T * scale)`` from each module's own input (``qkv`` projection, ``q_norm`` / ``k_norm``), which
is what the fused kernel computes; the forward itself is left untouched.

:func:`pixel_attention` maps an image pixel to its token (the encoder's zero padding to a multiple of the
patch size and the prefix tokens (cls / distillation) that precede the patch tokens, unless the encoder drops
them as SETR-MLA does) and returns that token's attention to every patch token, averaged over heads, as a
grid and upsampled to the image size.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from setr.models.encoder import ViTEncoder, pad_to_patch


def _encoder(model: nn.Module) -> ViTEncoder:
    enc = getattr(model, "encoder", model)
    if not isinstance(enc, ViTEncoder):
        raise TypeError(f"expected a SETR model or its ViTEncoder, got {type(model).__name__}")
    return enc


def num_prefix_in_blocks(model: nn.Module) -> int:
    """How many prefix tokens (cls, distillation...) precede the patch tokens inside the blocks."""
    enc = _encoder(model)
    return 0 if enc.drop_prefix_tokens else int(enc.num_prefix_tokens)


def _recompute(attn: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T * scale) of a timm ``Attention`` for its input ``x`` (B, N, C) -> (B, heads, N, N)."""
    if not hasattr(attn, "qkv"):
        raise TypeError(f"{type(attn).__name__}: no fused qkv projection; attention maps are not supported")
    b, n, _ = x.shape
    heads = attn.num_heads
    qkv = attn.qkv(x)
    qkv = qkv.reshape(b, n, 3, heads, qkv.shape[-1] // (3 * heads)).permute(2, 0, 3, 1, 4)
    q, k = qkv[0], qkv[1]
    q, k = attn.q_norm(q), attn.k_norm(k)
    return ((q * attn.scale) @ k.transpose(-2, -1)).float().softmax(dim=-1)


@torch.no_grad()
def attention_weights(model: nn.Module, images: torch.Tensor, blocks: Sequence[int] = (-1,)) -> dict[int, torch.Tensor]:
    """Attention weights ``(B, heads, N, N)`` of encoder ``blocks`` (0-based, negative from the end) for a
    normalised batch ``(B, 3, H, W)`` of any size; keys are the 0-based block indices.

    ``N`` = prefix tokens kept in the blocks (see :func:`num_prefix_in_blocks`) + ``ceil(H/16) * ceil(W/16)``
    patch tokens in row-major order. Only the encoder runs, up to the last block asked for.
    """
    enc = _encoder(model)
    idx = sorted({enc.resolve_block(i) for i in blocks})
    found: dict[int, torch.Tensor] = {}
    handles = []
    for i in idx:
        def hook(module, args, output, i=i):
            found[i] = _recompute(module, args[0])

        handles.append(enc.vit.blocks[i].attn.register_forward_hook(hook))
    try:
        enc(pad_to_patch(images, enc.patch_size), out_indices=[idx[-1]])
    finally:
        for h in handles:
            h.remove()
    return found


def token_index(model: nn.Module, y: int, x: int, size: Sequence[int]) -> tuple[int, int, int]:
    """``(token, row, col)`` of pixel ``(y, x)`` of an image of ``size = (H, W)``: ``token`` indexes the
    sequence inside the blocks (prefix tokens first), ``row, col`` the patch grid of the padded image."""
    enc = _encoder(model)
    h, w = int(size[0]), int(size[1])
    if not (0 <= y < h and 0 <= x < w):
        raise ValueError(f"pixel (y={y}, x={x}) is outside the {h}x{w} image")
    p = enc.patch_size
    cols = -(-w // p)
    row, col = y // p, x // p
    return num_prefix_in_blocks(enc) + row * cols + col, row, col


@dataclass
class PixelAttention:
    """What :func:`pixel_attention` returns."""

    grid: torch.Tensor  # (rows, cols): attention from the pixel's token to each patch token, mean over heads
    image: torch.Tensor  # (H, W): ``grid`` upsampled (bilinear) to the padded image and cropped to H x W
    token: int  # index of the pixel's token in the block's sequence (prefix tokens first)
    row: int
    col: int
    num_prefix: int  # prefix tokens in the sequence (cls / distillation); 0 when the encoder drops them
    prefix_share: float  # attention the pixel's token gives the prefix tokens (grid.sum() = 1 - prefix_share)
    block: int  # 0-based block index


def pixel_attention(model: nn.Module, image: torch.Tensor, y: int, x: int, block: int = -1) -> PixelAttention:
    """The attention of the token holding pixel ``(y, x)`` of ``image`` (normalised, ``(3, H, W)`` or
    ``(1, 3, H, W)``, any size) to all patch tokens in encoder ``block``, averaged over heads."""
    enc = _encoder(model)
    if image.dim() == 3:
        image = image[None]
    if image.dim() != 4 or image.shape[0] != 1:
        raise ValueError(f"expected one image (3, H, W) or (1, 3, H, W), got {tuple(image.shape)}")
    h, w = image.shape[-2:]
    b = enc.resolve_block(block)
    weights = attention_weights(enc, image, [b])[b][0]  # (heads, N, N)
    token, row, col = token_index(enc, y, x, (h, w))
    n = num_prefix_in_blocks(enc)
    p = enc.patch_size
    rows, cols = -(-h // p), -(-w // p)
    row_weights = weights[:, token].mean(0)  # (N,)
    grid = row_weights[n:].reshape(rows, cols)
    up = F.interpolate(grid[None, None], size=(rows * p, cols * p), mode="bilinear", align_corners=False)[0, 0]
    return PixelAttention(grid=grid, image=up[:h, :w], token=token, row=row, col=col, num_prefix=n,
                          prefix_share=float(row_weights[:n].sum()), block=b)
