"""Bilinear resizing as two small matrix products: the same function as ``F.interpolate(mode="bilinear")``,
with a backward pass that is a matrix product too.

PyTorch's bilinear upsampling computes its backward by scattering every output gradient into the input with
atomic adds. Upsampling by 16 (SETR's logits, 1/16 -> full resolution) sends 256 x 4 adds to each input element;
on a GPU in bf16 those adds run as compare-and-swap loops. Measured on an H200, SETR-MLA ViT-L at 512x512,
batch 8, bf16: ``upsample_bilinear2d_backward`` took 226 ms of a 315 ms training step (72 %). The products here
have no atomics, run on the matrix units and are deterministic (``torch.use_deterministic_algorithms`` refuses
the CUDA bilinear backward).

Bilinear interpolation is separable: ``out = A_h^T @ x @ A_w`` with ``A`` the (in, out) matrix of 1-D linear
interpolation weights. ``A`` is made by ``F.interpolate(mode="linear")`` of the identity, so the weights, the
border clamping, ``align_corners`` and ``scale_factor`` (PyTorch's source-index rule) are PyTorch's own. The
products run in the input's dtype with autocast off (bf16 / fp16 inputs: half-precision matmuls with fp32
accumulation, one extra rounding of the intermediate; fp32 inputs: fp32, or TF32 where the user enabled it).
While traced or exported (:func:`setr.models.encoder.is_tracing`) it calls ``F.interpolate``: the exported graph
then resizes any input size. So it does on meta tensors and inside :func:`plain_interpolate` (FLOP counts).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from setr.models.encoder import is_tracing

# (n_in, n_out, scale, align_corners, device, dtype) -> (n_in, n_out) weights; a handful of sizes per model
_CACHE: dict[tuple, torch.Tensor] = {}
_CACHE_MAX = 64
_PLAIN = [False]  # set by plain_interpolate()


@contextmanager
def plain_interpolate() -> Iterator[None]:
    """Within the block, :func:`resize` calls ``F.interpolate``: what FLOP counts use, so that resizing is not
    counted as model FLOPs (as fvcore and mmcv count), however it is computed."""
    before = _PLAIN[0]
    _PLAIN[0] = True
    try:
        yield
    finally:
        _PLAIN[0] = before


def interp_matrix(n_in: int, n_out: int, scale: float | None, align_corners: bool, device: torch.device,
                  dtype: torch.dtype) -> torch.Tensor:
    """The (n_in, n_out) matrix ``A`` of 1-D linear interpolation (``out = x @ A``), PyTorch's weights: row ``i``
    is ``F.interpolate(e_i, mode="linear")`` of the i-th unit vector."""
    key = (n_in, n_out, scale, align_corners, device, dtype)
    # traced by torch.compile: the matrix becomes a constant of the graph; reading the cache would make dynamo
    # guard on its keys (and recompile whenever an eager call adds one)
    compiling = torch.compiler.is_compiling()
    hit = None if compiling else _CACHE.get(key)
    if hit is not None:
        return hit
    # weights computed as F.interpolate computes them for this dtype (fp64 in double, everything else in fp32);
    # never as inference tensors (made during a validation under inference_mode, a cached matrix could not be
    # saved for backward in the next training step)
    with torch.inference_mode(False), torch.no_grad():
        eye = torch.eye(n_in, device=device, dtype=torch.float64 if dtype == torch.float64 else torch.float32)[None]
        if scale is None:
            a = F.interpolate(eye, size=n_out, mode="linear", align_corners=align_corners)[0]
        else:
            a = F.interpolate(eye, scale_factor=scale, mode="linear", align_corners=align_corners)[0]
        a = a.to(dtype)
    if not compiling:
        if len(_CACHE) >= _CACHE_MAX:
            _CACHE.clear()
        _CACHE[key] = a
    return a


def _size_of(n: int, scale: float) -> int:
    return int(n * scale)  # PyTorch: floor(input size x scale factor)


def resize(x: torch.Tensor, size: tuple[int, int] | None = None, scale_factor: float | None = None,
           align_corners: bool = False) -> torch.Tensor:
    """``F.interpolate(x, size | scale_factor, mode="bilinear", align_corners=...)`` of an (N, C, H, W) tensor,
    computed as two matrix products (module docstring). Exactly one of ``size`` and ``scale_factor``."""
    if (size is None) == (scale_factor is None):
        raise ValueError("resize: give exactly one of size and scale_factor")
    if _PLAIN[0] or is_tracing() or x.device.type == "meta" or x.dim() != 4 or not x.is_floating_point():
        return F.interpolate(x, size=size, scale_factor=scale_factor, mode="bilinear", align_corners=align_corners)
    n, c, h, w = x.shape
    if scale_factor is not None:
        ho, wo = _size_of(h, float(scale_factor)), _size_of(w, float(scale_factor))
        sh = sw = float(scale_factor)
    else:
        ho, wo = int(size[0]), int(size[1])
        sh = sw = None
    if (ho, wo) == (h, w):
        return x
    a_h = interp_matrix(h, ho, sh, align_corners, x.device, x.dtype)  # (h, ho)
    a_w = interp_matrix(w, wo, sw, align_corners, x.device, x.dtype)  # (w, wo)
    b = n * c
    with torch.autocast(x.device.type, enabled=False):  # meta tensors took F.interpolate above
        if not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
            # channels-last (model.channels_last): NHWC in memory; both products keep that layout
            p = x.permute(0, 2, 3, 1)  # (n, h, w, c), contiguous
            t = torch.bmm(a_w.t().expand(n * h, wo, w), p.reshape(n * h, w, c))  # (n*h, wo, c)
            out = torch.bmm(a_h.t().expand(n, ho, h), t.view(n, h, wo * c))  # (n, ho, wo*c)
            return out.view(n, ho, wo, c).permute(0, 3, 1, 2)
        if h * w * wo + ho * h * wo <= ho * h * w + ho * w * wo:  # width first: fewer multiply-adds
            t = (x.reshape(b * h, w) @ a_w).view(b, h, wo)
            out = torch.bmm(a_h.t().expand(b, ho, h), t)
        else:
            t = torch.bmm(a_h.t().expand(b, ho, h), x.reshape(b, h, w))
            out = (t.view(b * ho, w) @ a_w).view(b, ho, wo)
    return out.view(n, c, ho, wo)
