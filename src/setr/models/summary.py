"""Parameter counts and FLOPs per part of a SETR model (used by ``src/summary.py`` and the tests).

The model is built on PyTorch's ``meta`` device: no memory is allocated and no weights are initialised or
loaded, so ViT-L counts take about a second on a CPU. ``torch.utils.flop_counter.FlopCounterMode`` works on meta
tensors, and there attention goes through the math path of ``scaled_dot_product_attention`` (two ``bmm``), which
it counts; on a CPU the fused CPU attention kernel is not counted at all (about 14 % of ViT-L's FLOPs at 512).

FLOPs follow FlopCounterMode: 2 x multiply-accumulates of matmuls, convolutions and attention; norms, activations,
softmax and bilinear resizes are not counted.

Parts: ``encoder`` (the ViT), ``neck`` (the MLA neck, when there is one), ``decode_head`` and ``auxiliary_heads``.
The JSON line counts the neck inside ``encoder`` because the official SETR-MLA builds it into the backbone
(``backbone.mla``, trained at the backbone's learning rate); the table shows it on its own row.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from setr.errors import SETRConfigError
from setr.models.resize import plain_interpolate

PARTS = ("encoder", "neck", "decode_head", "auxiliary_heads")


# ------------------------------------------------------------------------------------------- counting
def count_params(module: nn.Module | None) -> tuple[int, int]:
    """(all, trainable) parameter counts of ``module`` (0, 0 for None). Shared parameters count once."""
    if module is None:
        return 0, 0
    params = list(module.parameters())
    return sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad)


def count_flops(model: nn.Module, input_size: Sequence[int], training: bool = False) -> dict[str, int]:
    """FLOPs of one forward pass of ``model`` on a ``(1, 3, H, W)`` input, split by top-level part.

    Returns ``total`` (everything counted in the pass) and one entry per part of :data:`PARTS` (0 when absent or
    not run; auxiliary heads only run in training mode). Runs under ``torch.no_grad()`` on the model's device
    and restores its mode afterwards; a training-mode pass updates BatchNorm running statistics, so use a meta
    model (see :func:`build_meta_model`) or a copy.
    """
    h, w = input_size
    try:
        device = next(model.parameters()).device
    except StopIteration:
        device = torch.device("cpu")
    x = torch.zeros(1, 3, h, w, device=device)
    was_training = model.training
    model.train(training)
    counter = FlopCounterMode(display=False)
    try:
        with torch.no_grad(), plain_interpolate(), counter:  # resizing is not counted, whichever way it runs
            model(x)
    finally:
        model.train(was_training)
    # FlopCounterMode keys modules by their path from the root, which it names after the root's class
    per_module = {name: sum(ops.values()) for name, ops in counter.get_flop_counts().items()}
    root = type(model).__name__
    out = {"total": int(counter.get_total_flops())}
    for part in ("encoder", "neck", "decode_head"):
        out[part] = int(per_module.get(f"{root}.{part}", 0))
    n_aux = len(getattr(model, "auxiliary_heads", ()))
    out["auxiliary_heads"] = int(sum(per_module.get(f"{root}.auxiliary_heads.{i}", 0) for i in range(n_aux)))
    return out


def build_meta_model(model_cfg: Mapping) -> nn.Module:
    """Build SETR from a resolved ``model`` config on the meta device (shapes only; ``pretrained`` is ignored)."""
    from setr.models import build_setr

    cfg = dict(model_cfg)
    if isinstance(cfg.get("encoder"), Mapping):
        # the weights change no count; loading them into meta tensors would only cost time
        cfg["encoder"] = {**cfg["encoder"], "pretrained": None}
    with torch.device("meta"):
        return build_setr(cfg)


@dataclass
class Row:
    part: str
    label: str
    params: int
    trainable: int
    flops: int | None  # None: not counted


def summarize_model(model: nn.Module, input_size: Sequence[int] | None, flops: bool = True) -> dict[str, Any]:
    """Counts for a built SETR. ``input_size`` (H, W) is needed when ``flops`` is true.

    Returns ``rows`` (one :class:`Row` per part present), ``eval_flops`` (one eval forward: encoder, neck,
    decode head), ``train_flops`` (one training forward, auxiliary heads included) and ``json``, the
    entry point's last line: ``total``, ``encoder`` (neck included), ``decode_head``, ``auxiliary_heads``
    (parameter counts) and ``gflops`` (eval forward; None when not counted).
    """
    ev = tr = None
    if flops:
        if input_size is None:
            raise SETRConfigError("summary.input_size: needed to count FLOPs")
        ev = count_flops(model, input_size, training=False)
        tr = count_flops(model, input_size, training=True)
    n_aux = len(model.auxiliary_heads)
    enc = model.encoder
    rows = [Row("encoder", f"encoder ({enc.name}: {enc.depth} blocks, dim {enc.embed_dim})",
                *count_params(enc), ev and ev["encoder"])]
    if model.neck is not None:
        rows.append(Row("neck", "neck (MLA; in the official backbone)", *count_params(model.neck), ev and ev["neck"]))
    rows.append(Row("decode_head", f"decode_head ({type(model.decode_head).__name__})",
                    *count_params(model.decode_head), ev and ev["decode_head"]))
    if n_aux:
        weights = sorted(set(model.aux_weights))
        w = ", ".join(f"{x:g}" for x in weights)
        rows.append(Row("auxiliary_heads", f"auxiliary_heads ({n_aux} x {type(model.auxiliary_heads[0]).__name__}, "
                                           f"loss weight {w})",
                        *count_params(model.auxiliary_heads), tr and tr["auxiliary_heads"]))
    total, _ = count_params(model)
    by_part = {r.part: r.params for r in rows}
    result = {
        "total": total,
        "encoder": by_part["encoder"] + by_part.get("neck", 0),
        "decode_head": by_part["decode_head"],
        "auxiliary_heads": by_part.get("auxiliary_heads", 0),
        "gflops": ev["total"] / 1e9 if ev else None,
    }
    return {"rows": rows, "eval_flops": ev, "train_flops": tr, "json": result, "total": count_params(model)}
