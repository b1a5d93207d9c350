"""The dtype copies of a bf16 autocast training step (benchmarks/dtype_copies.py records them): the needed ones
(autocast's fp32 -> bf16 cast of each weight once per forward and the cast of its gradient back) and none of
the unneeded ones: no full-resolution (per-band) cast of the logits in the loss, no float32 copy of a head's
LayerNorm output that the next convolution casts down anyway."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from tests.conftest import tiny_model_cfg

from setr.checkpoint import ModelRecord
from setr.training import SETRModule

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("benchmarks_dtype_copies", ROOT / "benchmarks" / "dtype_copies.py")
audit = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(audit)

CROP, BATCH, CLASSES = 64, 2, 5


def _module(head: str, *overrides: str) -> SETRModule:
    """The tiny test encoder (embed 64, 2 blocks) under a real head config, random weights, fused loss."""
    torch.manual_seed(0)
    model = tiny_model_cfg(head, CROP, CLASSES, "model.encoder.arch.depth=2", *overrides)
    record = ModelRecord(model=model, class_names=[str(i) for i in range(CLASSES)], palette=[], crop_size=CROP)
    return SETRModule(record=record)


# 2 blocks: the heads read blocks 0 and 1 (MLA: the neck's two levels; Naive / PUP: decode on 1, one aux on 0)
HEADS = {
    "mla": ("model.encoder.out_indices=[0,1]", "model.head.decode.in_index=[0,1]",
            "model.head.auxiliary.in_index=[0,1]"),
    "naive": ("model.encoder.out_indices=[0,1]", "model.head.decode.in_index=1", "model.head.auxiliary.in_index=[0]"),
    "pup": ("model.encoder.out_indices=[0,1]", "model.head.decode.in_index=1", "model.head.auxiliary.in_index=[0]"),
}


def _step(head: str, dtype=torch.bfloat16, *overrides: str):
    module = _module(head, *HEADS[head], *overrides)
    records = audit.audit_step(module, BATCH, CROP, "cpu", dtype, warmup=1) if dtype is not None else None
    return module, records


def _logit_sizes(module: SETRModule) -> set[int]:
    """Elements of each head's logits (B, C, h, w) at their own resolution."""
    module.train()
    with torch.no_grad():
        out = module(torch.zeros(BATCH, 3, CROP, CROP), low_res=True)
    return {t.numel() for t in [out["out"], *out["aux"]]}


def _is_loss(r: dict) -> bool:
    return "seg_loss.py" in r["frame"] or "UpsampledCrossEntropy" in (r["node"] or "")


def _dtype_copies(records):
    return [r for r in records if r["src"] != r["dst"]]


@pytest.mark.parametrize("head", sorted(HEADS))
def test_the_loss_casts_each_heads_logits_once_at_their_own_resolution(head):
    """Half-precision logits are cast up once (forward, and again in the backward's recomputation) and their
    gradient cast down once, all at the heads' resolution: never a band of full-resolution logits (64 x 64 here,
    the heads predict at 1/16 .. 1/4 of it)."""
    module, records = _step(head)
    sizes = _logit_sizes(module)
    heads = 1 + len(module.model.auxiliary_heads)
    loss = [r for r in _dtype_copies(records) if _is_loss(r)]
    full = [r for r in loss if torch.Size(r["shape"]).numel() not in sizes]
    assert not full, f"full-resolution casts in the loss: {[(r['shape'], r['src'], r['dst']) for r in full]}"
    up = [r for r in loss if r["src"] == torch.bfloat16 and r["dst"] == torch.float32]
    down = [r for r in loss if r["src"] == torch.float32 and r["dst"] == torch.bfloat16]
    assert (len(up), len(down), len(loss)) == (2 * heads, heads, 3 * heads)


@pytest.mark.parametrize("head", sorted(HEADS))
@pytest.mark.parametrize("channels_last", [False, True])
def test_head_layernorm_output_is_not_copied_in_float32_and_cast_again(head, channels_last):
    """The heads' / neck's ChannelLayerNorm reads the float32 residual stream; under autocast its output goes
    straight to a convolution, which would cast it to bf16: the norm writes it in bf16 (one copy, which is also
    the NCHW layout copy) instead of a float32 copy that autocast casts again."""
    _, records = _step(head, torch.bfloat16, f"model.channels_last={str(channels_last).lower()}")
    at_conv = [r for r in _dtype_copies(records) if r["phase"] == "forward" and r["param"] is None
               and (r["module"] or "").split(".")[0] in ("neck", "decode_head", "auxiliary_heads")
               and r["module_type"] == "Conv2d"]
    assert not at_conv, f"activation casts at the heads' convolutions: {[(r['module'], r['shape']) for r in at_conv]}"
    f32_layout = [r for r in records
                  if r["src"] == r["dst"] == torch.float32 and r["module_type"] == "ChannelLayerNorm"]
    assert not f32_layout, "float32 layout copy of a head LayerNorm's output"
    norms = [r for r in _dtype_copies(records) if r["module_type"] == "ChannelLayerNorm"]
    n_norms = sum(type(m).__name__ == "ChannelLayerNorm" for m in _module(head, *HEADS[head]).model.modules())
    assert len(norms) == n_norms and all(r["dst"] == torch.bfloat16 for r in norms)


@pytest.mark.parametrize("head", sorted(HEADS))
def test_each_weight_is_cast_once_forward_and_its_gradient_once_backward(head):
    """The needed copies: autocast casts every convolution / linear weight (and bias) to bf16 once per forward
    and the backward casts its gradient back to float32 once (float32 master weights)."""
    module, records = _step(head)
    copies = _dtype_copies(records)
    fwd = [r["param"] for r in copies if r["phase"] == "forward" and r["param"] is not None]
    assert len(fwd) == len(set(fwd)), "a weight was cast more than once in one forward"
    assert all(r["src"] == torch.float32 and r["dst"] == torch.bfloat16 for r in copies if r["param"] is not None)
    cast_modules = {n.rsplit(".", 1)[0] for n in fwd}
    convs = {n for n, m in module.model.named_modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))}
    assert cast_modules == convs
    grads = [r for r in copies if r["phase"] == "backward" and r["node"] == "ToCopyBackward0" and r["param_grad"]]
    assert len(grads) == len(fwd)


@pytest.mark.parametrize("head", ["mla", "naive"])
def test_a_float32_step_makes_no_dtype_copy(head):
    module = _module(head, *HEADS[head])
    records = audit.audit_step(module, BATCH, CROP, "cpu", None, warmup=0)
    assert _dtype_copies(records) == []


def test_the_table_sums_the_records():
    module, records = _step("mla")
    table = audit.tally(records, module.model)
    assert sum(e["count"] for e in table.values()) == len(records)
    assert abs(sum(e["mb"] for e in table.values()) - sum(r["bytes"] for r in records) / 1e6) < 1e-6
    assert table["fwd weight cast (autocast) f32->bf16"]["count"] == table["bwd weight grad bf16->f32"]["count"]


@pytest.mark.parametrize("keep_layout", [False, True])
def test_channel_layernorm_dtype_and_layout(keep_layout):
    """float32: float32 out; under bf16 autocast: bf16 out, the same values as the float32 output rounded (what
    the convolution after it would have cast); NCHW-contiguous, or channels-last with ``keep_layout``."""
    from setr.models.norm import ChannelLayerNorm

    torch.manual_seed(0)
    norm = ChannelLayerNorm(8, eps=1e-6)
    norm.keep_layout = keep_layout
    x = torch.randn(2, 8, 5, 3)
    fmt = torch.channels_last if keep_layout else torch.contiguous_format
    y32 = norm(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y16 = norm(x)
    assert y32.dtype == torch.float32 and y16.dtype == torch.bfloat16
    assert y32.is_contiguous(memory_format=fmt) and y16.is_contiguous(memory_format=fmt)
    assert torch.equal(y16, y32.to(torch.bfloat16))
