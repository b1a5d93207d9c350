"""Cross-entropy of bilinearly upsampled logits against a full-resolution label, without full-resolution logits.

SETR's heads predict at 1/16 (or 1/4) of the input size; the loss is the cross-entropy of those logits resized to
the (padded) input size, cropped to the label, against the label (mmsegmentation's ``resize`` + ``CrossEntropyLoss``,
mean over the pixels that are not ``ignore_index``). Computed the plain way, each head holds a float32
``B x C x H x W`` copy of its upsampled logits, and the log-softmax reduces over the strided class dimension.

:func:`upsampled_cross_entropy` is the same function as

    F.cross_entropy(F.interpolate(x, size, mode="bilinear", align_corners=ac)[..., :H, :W], target,
                    ignore_index=ignore_index)

computed by bands of output rows, as one autograd function. Bilinear resizing is separable (``A_h^T x A_w``, the
(in, out) interpolation matrices of :func:`setr.models.resize.interp_matrix`: PyTorch's own weights): the width is
resized once, class-contiguous (``B x h x W x C``, 1/16 of the full size for SETR), then each band of output rows is
one matrix product over the few input rows its weights touch (the other weights are exact zeros), its log-softmax
runs over contiguous classes in float32 and only the band's summed loss is kept. The backward recomputes each
band, forms ``softmax - one_hot`` there (one gather / scatter per pixel, no accumulation) and sends it back through
the transposed products: no atomics, deterministic on every device. Peak memory is a band (``chunk_elems``
elements) instead of the full-resolution logits and their log-softmax.

Dtypes: everything runs in float32 (float64 for float64 logits): half-precision logits are cast up once, at their
own (low) resolution, and the gradient is cast back to their dtype once, at the same resolution. The resizing
products, the log-softmax, the loss and the gradient accumulation are float32; no band of full-resolution logits
is ever cast (casting each band up in the forward and in the backward, and its gradient down, were three
full-resolution dtype copies per head: benchmarks/dtype_copies.py). For bf16 logits the loss is the reference's
on the logits resized in float32 (one bf16 rounding fewer than resizing them in bf16 first). The loss is float32
(float64); the gradient has the logits' dtype.

All pixels ignored: the loss is ``nan`` and the gradient zero, as ``F.cross_entropy`` gives (0 / 0).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from setr.models.resize import interp_matrix

# elements (B x rows x W x C) of one band of full-resolution logits. CPU: 2^22 float32 = 16 MiB a band (on a
# loaded 2-core CPU, B=2, C=150, 32x32 -> 512x512, smaller bands cost more in per-operation overhead than they saved;
# benchmarks/loss_path.py). CUDA: 2^25 (128 MiB), so that a batch of 8 at 512x512 with 150 classes takes ~10 bands
# (each band launches a dozen kernels). Not measured on a GPU yet.
CHUNK_ELEMS = {"cuda": 1 << 25}
CHUNK_ELEMS_DEFAULT = 1 << 22
# model.loss_path (setr.training.module.SETRModule.compute_loss): this module's function on the heads' logits before
# their resize (fused), or F.cross_entropy of the logits resized to the input (reference: the plain computation)
LOSS_PATHS = ("fused", "reference")


# PyTorch's CPU softmax over a contiguous last axis runs one row at a time: with a short class axis (the synthetic
# data's 5 classes) it is several times slower than over the class axis of NCHW, which vectorises across pixels
# (8 x 5 x 8 x 8 -> 128 x 128, forward + backward: 16.1 ms, 3.6 ms this way, 1.7-2.4 ms the reference path;
# benchmarks/loss_path.py). Below this many classes a CPU band is normalised in NCHW (two small layout copies;
# 4 x C x 16 x 16 -> 256 x 256: 8 classes 14 against 49 ms, 19 classes 33 against 30 ms, 32 classes 93 against
# 36 ms); CUDA's short-row kernel needs none.
CPU_SHORT_CLASSES = 16


def _class_first(z: torch.Tensor) -> bool:
    return z.device.type == "cpu" and z.shape[-1] < CPU_SHORT_CLASSES


def _band_ce_sum(z: torch.Tensor, target: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """Summed cross-entropy of a band ``z`` (B, r, W, C), classes contiguous, against ``target`` (B, r, W)."""
    if _class_first(z):
        return F.cross_entropy(z.permute(0, 3, 1, 2).contiguous(), target, ignore_index=ignore_index,
                               reduction="sum")
    return F.cross_entropy(z.view(-1, z.shape[-1]), target.reshape(-1), ignore_index=ignore_index, reduction="sum")


def _band_softmax(z: torch.Tensor) -> torch.Tensor:
    """Softmax over the classes of a band ``z`` (B, r, W, C), returned contiguous in the same layout."""
    if _class_first(z):
        return torch.softmax(z.permute(0, 3, 1, 2).contiguous(), dim=1).permute(0, 2, 3, 1).contiguous()
    return torch.softmax(z, dim=-1)


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


@functools.lru_cache(maxsize=64)
def _band_inputs(h: int, hp: int, ho: int, align_corners: bool, rows: int) -> tuple[tuple[int, int], ...]:
    """Per band of ``rows`` output rows: the input rows ``(lo, hi)`` its interpolation weights touch (bilinear: two
    per output row, so about rows x h / hp + 2 of them). Plain Python arithmetic on the sizes (no tensor, so
    neither the device nor ``torch.compile`` is asked: the loss traces as one graph): PyTorch's source index of
    the band's first and last output row, widened by a row each way against its float32 rounding. The range may
    hold a row more than the weights touch, whose weights are exact zeros, so the products over the range alone
    give the same values."""
    scale = ((h - 1) / (hp - 1) if hp > 1 else 0.0) if align_corners else h / hp

    def src(r: int) -> float:
        return scale * r if align_corners else max(scale * (r + 0.5) - 0.5, 0.0)

    out = []
    for r0 in range(0, ho, rows):
        r1 = min(r0 + rows, ho)
        out.append((max(0, int(src(r0) - 1e-6)), min(h, int(src(r1 - 1) + 1e-6) + 2)))
    return tuple(out)


class _Plan:
    """The interpolation of one call: matrices (None: that dimension is not resized), sizes, bands."""

    def __init__(self, x: torch.Tensor, size: tuple[int, int], out: tuple[int, int], align_corners: bool,
                 chunk_elems: int) -> None:
        b, c, h, w = x.shape
        self.b, self.c, self.h, self.w = b, c, h, w
        self.hp, self.wp = size  # the resized (padded) size
        self.ho, self.wo = out  # the label's size: the top-left crop of the resized logits
        dt = self.dtype = _acc_dtype(x.dtype)  # every product in float32 (float64), whatever the logits' dtype
        # (h, ho) / (w, wo): the padded size's matrices, cropped to the label's rows / columns
        self.a_h = None if h == self.hp else interp_matrix(h, self.hp, None, align_corners, x.device, dt)[:, :self.ho]
        self.a_w = None if w == self.wp else interp_matrix(w, self.wp, None, align_corners, x.device, dt)[:, :self.wo]
        per_row = max(1, b * self.wo * c)
        self.rows = max(1, min(self.ho, chunk_elems // per_row))
        starts = range(0, self.ho, self.rows)
        inputs = [(r0, r0 + 1) for r0 in starts] if self.a_h is None else \
            _band_inputs(h, self.hp, self.ho, align_corners, self.rows)
        # (r0, r1, lo, hi): output rows r0:r1 are made of input rows lo:hi
        self.bands = [(r0, min(r0 + self.rows, self.ho), lo, hi) for r0, (lo, hi) in zip(starts, inputs)]

    def width(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` (B, C, h, w) resized along the width and cropped: (B, h, wo, C), classes contiguous, in
        float32 (float64)."""
        # (B, h, w, C) in the plan's dtype: low resolution, one copy for the layout and (half precision) the cast
        p = x.permute(0, 2, 3, 1)
        # (Tensor.to(memory_format=...) with the same dtype returns the tensor itself, whatever its strides)
        p = p.contiguous() if p.dtype == self.dtype else p.to(self.dtype, memory_format=torch.contiguous_format)
        if self.a_w is None:
            return p[:, :, :self.wo].contiguous()
        b, h, w, c = p.shape
        t = torch.bmm(self.a_w.t().expand(b * h, self.wo, w), p.view(b * h, w, c))  # (B*h, wo, C)
        return t.view(b, h, self.wo, c)

    def rows_of(self, t: torch.Tensor, band: tuple[int, int, int, int]) -> torch.Tensor:
        """The band's output rows of the width-resized ``t``: (B, R, wo, C), a tensor of its own (never a view of
        ``t``; the same buffer for every band of a call: no fresh allocation per band)."""
        r0, r1, lo, hi = band
        b, _, wo, c = t.shape
        buf = getattr(self, "_buf", None)
        if buf is None:
            buf = self._buf = t.new_empty(b * self.rows * wo * c)
        z = buf[:b * (r1 - r0) * wo * c].view(b, r1 - r0, wo * c)
        if self.a_h is None:
            z.view(b, r1 - r0, wo, c).copy_(t[:, r0:r1])
        else:
            a = self.a_h[lo:hi, r0:r1].t()  # (R, K): the band's weights, K = the input rows it reads
            torch.bmm(a.expand(b, r1 - r0, hi - lo), t[:, lo:hi].reshape(b, hi - lo, wo * c), out=z)
        return z.view(b, r1 - r0, wo, c)

    def rows_back(self, g_t: torch.Tensor, g: torch.Tensor, band: tuple[int, int, int, int]) -> None:
        """Add the band's gradient ``g`` (B, R, wo, C) into ``g_t`` (B, h, wo, C): the transposed product."""
        r0, r1, lo, hi = band
        if self.a_h is None:
            g_t[:, r0:r1] = g
            return
        b, r, wo, c = g.shape
        a = self.a_h[lo:hi, r0:r1]  # (K, R)
        rows = g_t[:, lo:hi].view(b, hi - lo, wo * c)
        rows.baddbmm_(a.expand(b, hi - lo, r), g.view(b, r, wo * c))  # accumulated in the product (one dtype)


class UpsampledCrossEntropy(torch.autograd.Function):
    """The autograd function of :func:`upsampled_cross_entropy` (its arguments, positional)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, target: torch.Tensor, size: tuple[int, int], align_corners: bool,
                ignore_index: int, chunk_elems: int) -> torch.Tensor:
        acc = _acc_dtype(x.dtype)
        with torch.autocast(x.device.type, enabled=False):
            plan = _Plan(x, size, tuple(target.shape[-2:]), align_corners, chunk_elems)
            t = plan.width(x)  # half precision: the one cast up, at the logits' resolution
            total = torch.zeros((), dtype=acc, device=x.device)
            for band in plan.bands:
                r0, r1 = band[:2]
                z = plan.rows_of(t, band)  # in acc already
                # log-softmax over the classes, summed over the band's labelled pixels
                total += _band_ce_sum(z, target[:, r0:r1], ignore_index)
            count = (target != ignore_index).sum()
        ctx.save_for_backward(x, target, count)
        ctx.args = (size, align_corners, ignore_index, chunk_elems)
        return total / count  # all ignored: 0 / 0 = nan, as F.cross_entropy

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        x, target, count = ctx.saved_tensors
        size, align_corners, ignore_index, chunk_elems = ctx.args
        acc = _acc_dtype(x.dtype)
        with torch.autocast(x.device.type, enabled=False):
            plan = _Plan(x, size, tuple(target.shape[-2:]), align_corners, chunk_elems)
            t = plan.width(x)
            # d loss / d logit of a pixel = scale * (softmax - one_hot); all ignored: zero (no pixel counts)
            scale = torch.where(count > 0, grad.to(acc) / count.clamp_min(1), 0)
            b, h, wo, c = plan.b, plan.h, plan.wo, plan.c
            g_t = torch.zeros((b, h, wo, c), dtype=acc, device=x.device)
            valid = target != ignore_index
            index = target.masked_fill(~valid, 0).unsqueeze(-1)  # (B, H, W, 1): the label's class, 0 if ignored
            weight = torch.where(valid, scale, 0).unsqueeze(-1)  # (B, H, W, 1)
            for band in plan.bands:
                r0, r1 = band[:2]
                g = _band_softmax(plan.rows_of(t, band))  # classes contiguous
                idx = index[:, r0:r1]
                g.scatter_(-1, idx, g.gather(-1, idx) - 1)  # - one_hot: one index per pixel, no accumulation
                g.mul_(weight[:, r0:r1])
                plan.rows_back(g_t, g, band)
            if plan.a_w is None:
                g_p = g_t.new_zeros((b, h, plan.w, c))
                g_p[:, :, :wo] = g_t
            else:
                g_p = torch.bmm(plan.a_w.expand(b * h, plan.w, wo), g_t.view(b * h, wo, c))
                g_p = g_p.view(b, h, plan.w, c)
            dx = g_p.permute(0, 3, 1, 2)  # (B, C, h, w), channels-last in memory
            # the logits' dtype (the one cast of the gradient, at their resolution) and, for contiguous logits,
            # their layout: one copy for both
            if dx.dtype != x.dtype:
                fmt = torch.contiguous_format if x.is_contiguous() else torch.preserve_format
                dx = dx.to(x.dtype, memory_format=fmt)
            elif x.is_contiguous():
                dx = dx.contiguous()
        return dx, None, None, None, None, None


def upsampled_cross_entropy(logits: torch.Tensor, target: torch.Tensor, size: Sequence[int] | None = None,
                            align_corners: bool = False, ignore_index: int = 255,
                            chunk_elems: int | None = None) -> torch.Tensor:
    """Mean cross-entropy over the non-ignored pixels of ``logits`` (B, C, h, w) resized bilinearly to ``size``
    (default: the label's size) and cropped to the label ``target`` (B, H, W) at the top left: the value and
    gradients of ``F.cross_entropy(F.interpolate(logits, size, mode="bilinear",
    align_corners=align_corners)[..., :H, :W], target, ignore_index=ignore_index)``, band by band (module
    docstring). ``chunk_elems``: elements of full-resolution logits per band (default: :data:`CHUNK_ELEMS` of the
    device)."""
    if logits.dim() != 4 or target.dim() != 3 or logits.shape[0] != target.shape[0]:
        raise ValueError(f"upsampled_cross_entropy: expected logits (B, C, h, w) and target (B, H, W), got "
                         f"{tuple(logits.shape)} and {tuple(target.shape)}")
    if not logits.is_floating_point():
        raise ValueError(f"upsampled_cross_entropy: logits must be floating point, got {logits.dtype}")
    out = tuple(int(s) for s in target.shape[-2:])
    size = out if size is None else (int(size[0]), int(size[1]))
    if size[0] < out[0] or size[1] < out[1]:
        raise ValueError(f"upsampled_cross_entropy: the resized size {size} is smaller than the label {out}")
    if target.dtype != torch.long:
        target = target.long()
    if chunk_elems is None:
        chunk_elems = CHUNK_ELEMS.get(logits.device.type, CHUNK_ELEMS_DEFAULT)
    return UpsampledCrossEntropy.apply(logits, target, size, bool(align_corners), int(ignore_index),
                                       int(chunk_elems))
