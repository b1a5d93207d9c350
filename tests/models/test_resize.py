"""setr.models.resize: bilinear resizing as matrix products, the same function as F.interpolate (values and
gradients), used by every head and by SETR's logits upsampling; F.interpolate while traced."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_model_cfg
from setr.errors import SETRConfigError
from setr.models import build_setr
from setr.models import resize as resize_mod
from setr.models.resize import interp_matrix, resize

os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS (as Lightning's deterministic)
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
CASES = [
    ((2, 3, 8, 8), {"scale_factor": 4}, False),
    ((2, 3, 8, 8), {"scale_factor": 4}, True),  # MLA: align_corners=True
    ((1, 5, 4, 6), {"scale_factor": 16}, False),  # logits 1/16 -> full resolution
    ((2, 3, 7, 9), {"size": (20, 31)}, False),  # odd sizes (slide windows, original image sizes)
    ((2, 3, 20, 31), {"size": (7, 9)}, False),  # downsampling
    ((2, 3, 20, 31), {"size": (7, 9)}, True),
    ((1, 2, 13, 17), {"size": (13, 40)}, False),  # one axis only
    ((1, 2, 5, 6), {"scale_factor": 2.5}, False),  # PyTorch's scale_factor source-index rule
    ((1, 1, 1, 5), {"size": (3, 5)}, False),
    ((1, 1, 6, 1), {"size": (3, 4)}, True),  # align_corners with a one-pixel axis
]


def _reference_and_ours(shape, kw, align, dtype, device):
    torch.manual_seed(0)
    x = torch.randn(*shape, dtype=dtype, device=device, requires_grad=True)
    ref = F.interpolate(x, mode="bilinear", align_corners=align, **kw)
    ours = resize(x, align_corners=align, **kw)
    g = torch.randn_like(ref)
    (g_ref,) = torch.autograd.grad(ref, x, g)
    (g_ours,) = torch.autograd.grad(ours, x, g)
    return ref, ours, g_ref, g_ours


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("shape", "kw", "align"), CASES)
def test_same_function_as_interpolate_float64(shape, kw, align, device):
    ref, ours, g_ref, g_ours = _reference_and_ours(shape, kw, align, torch.float64, device)
    assert ours.shape == ref.shape and ours.dtype == ref.dtype
    assert (ours - ref).abs().max().item() < 1e-12
    assert (g_ours - g_ref).abs().max().item() < 1e-12


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("shape", "kw", "align"), CASES[:5])
def test_float32_and_bf16_within_their_tolerance(shape, kw, align, device):
    ref, ours, g_ref, g_ours = _reference_and_ours(shape, kw, align, torch.float32, device)
    assert torch.allclose(ours, ref, atol=1e-5, rtol=1e-5) and torch.allclose(g_ours, g_ref, atol=1e-4, rtol=1e-5)
    torch.manual_seed(0)
    x = torch.randn(*shape, device=device)
    with torch.autocast(device, dtype=torch.bfloat16):  # autocast is switched off inside: the input dtype rules
        half = resize(x.bfloat16(), align_corners=align, **kw)
    assert half.dtype == torch.bfloat16
    assert torch.allclose(half.float(), ref.detach(), atol=3e-2, rtol=3e-2)


def test_same_size_is_the_input_and_bad_arguments():
    x = torch.randn(1, 2, 5, 5)
    assert resize(x, size=(5, 5)) is x
    with pytest.raises(ValueError, match="exactly one of size and scale_factor"):
        resize(x, size=(4, 4), scale_factor=2)
    with pytest.raises(ValueError, match="exactly one of size and scale_factor"):
        resize(x)


def test_matrix_rows_are_interpolated_unit_vectors_and_cached():
    a = interp_matrix(4, 8, None, False, torch.device("cpu"), torch.float32)
    assert a.shape == (4, 8) and torch.allclose(a.sum(0), torch.ones(8))  # each output is a convex combination
    assert interp_matrix(4, 8, None, False, torch.device("cpu"), torch.float32) is a


def test_traced_graph_uses_interpolate_and_resizes_other_sizes():
    class Up(torch.nn.Module):
        def forward(self, x):
            return resize(x, scale_factor=4)

    traced = torch.jit.trace(Up(), torch.randn(1, 2, 4, 6))
    assert "upsample_bilinear2d" in str(traced.graph)
    x = torch.randn(1, 2, 5, 3)
    assert torch.allclose(traced(x), F.interpolate(x, scale_factor=4, mode="bilinear", align_corners=False))


@pytest.mark.parametrize("head", ["pup", "mla", "naive"])
def test_setr_training_forward_runs_no_bilinear_kernel(head, monkeypatch):
    """The heads (with their auxiliary heads) and the logits upsampling go through resize: no bilinear
    F.interpolate in a training step, only the 1-D ``linear`` ones that make the (then cached) matrices."""
    net = build_setr(tiny_model_cfg(head, 64, 5)).train()
    calls = []
    real = F.interpolate
    monkeypatch.setattr(F, "interpolate", lambda *a, **k: calls.append(k.get("mode")) or real(*a, **k))
    monkeypatch.setattr(resize_mod, "_CACHE", {})
    out = net(torch.randn(2, 3, 64, 64))
    assert calls and set(calls) == {"linear"}
    made = len(calls)
    out = net(torch.randn(2, 3, 64, 64))
    assert len(calls) == made  # second step: matrices cached
    (out["out"].sum() + sum(a.sum() for a in out["aux"])).backward()
    assert out["out"].shape == (2, 5, 64, 64) and len(calls) == made


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_backward_is_deterministic():
    x = torch.randn(2, 19, 48, 48, device="cuda", requires_grad=True)
    torch.use_deterministic_algorithms(True)
    try:
        grads = []
        for _ in range(2):
            (g,) = torch.autograd.grad(resize(x, scale_factor=16).square().sum(), x)
            grads.append(g)
    finally:
        torch.use_deterministic_algorithms(False)
    assert torch.equal(grads[0], grads[1])


def test_plain_interpolate_block_and_meta_tensors_use_interpolate(monkeypatch):
    calls = []
    real = F.interpolate
    monkeypatch.setattr(F, "interpolate", lambda *a, **k: calls.append(k.get("mode")) or real(*a, **k))
    monkeypatch.setattr(resize_mod, "_CACHE", {})
    with resize_mod.plain_interpolate():
        resize(torch.randn(1, 2, 4, 4), scale_factor=2)
    resize(torch.empty(1, 2, 4, 4, device="meta"), scale_factor=2)
    assert calls == ["bilinear", "bilinear"]
    resize(torch.randn(1, 2, 4, 4), scale_factor=2)  # outside the block: matrix products
    assert calls[2:] == ["linear"]  # one matrix serves both axes of a square


def test_model_resize_interpolate_runs_the_reference_kernels(monkeypatch):
    torch.manual_seed(0)
    fast = build_setr(tiny_model_cfg("mla", 64, 5)).eval()
    ref = build_setr({**tiny_model_cfg("mla", 64, 5), "resize": "interpolate"}).eval()
    ref.load_state_dict(fast.state_dict())
    assert fast.resize == "matmul" and ref.resize == "interpolate"
    x = torch.randn(1, 3, 64, 80)
    calls = []
    real = F.interpolate
    monkeypatch.setattr(F, "interpolate", lambda *a, **k: calls.append(k.get("mode")) or real(*a, **k))
    with torch.no_grad():
        a = ref(x)
        assert calls and set(calls) == {"bilinear"}
        b = fast(x)
    assert torch.allclose(a, b, atol=1e-5)
    with pytest.raises(SETRConfigError, match=r"model\.resize: expected one of matmul, interpolate, got 'bicubic'"):
        build_setr({**tiny_model_cfg("mla", 64, 5), "resize": "bicubic"})


@pytest.mark.parametrize(("shape", "kw", "align"), CASES[:6])
def test_channels_last_input_keeps_its_layout(shape, kw, align):
    torch.manual_seed(0)
    x = torch.randn(*shape, dtype=torch.float64).contiguous(memory_format=torch.channels_last).requires_grad_()
    ref = F.interpolate(x.detach().contiguous().requires_grad_(), mode="bilinear", align_corners=align, **kw)
    ours = resize(x, align_corners=align, **kw)
    if shape[1] > 1:
        assert ours.is_contiguous(memory_format=torch.channels_last)
    assert (ours - ref).abs().max().item() < 1e-12
    g = torch.randn_like(ref)
    (g_ours,) = torch.autograd.grad(ours, x, g)
    assert torch.allclose(g_ours, torch.autograd.grad(F.interpolate(x, mode="bilinear", align_corners=align, **kw),
                                                      x, g)[0], atol=1e-12)


@pytest.mark.parametrize("head", ["pup", "mla", "naive"])
def test_model_channels_last_same_logits_and_heads_run_channels_last(head):
    torch.manual_seed(0)
    plain = build_setr(tiny_model_cfg(head, 64, 5)).train()
    fast = build_setr({**tiny_model_cfg(head, 64, 5), "channels_last": True}).train()
    fast.load_state_dict(plain.state_dict())
    seen = []
    cl = torch.channels_last
    for m in fast.decode_head.modules():
        if isinstance(m, torch.nn.Conv2d):
            m.register_forward_pre_hook(lambda _m, a: seen.append(a[0].is_contiguous(memory_format=cl)))
            assert m.weight.is_contiguous(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 64, 64)
    a, b = plain(x), fast(x)
    assert seen and all(seen)  # every convolution of the decode head gets a channels-last input
    assert torch.allclose(a["out"], b["out"], atol=1e-5)
    for pa, pb in zip(a["aux"], b["aux"]):
        assert torch.allclose(pa, pb, atol=1e-5)
    (b["out"].sum() + sum(t.sum() for t in b["aux"])).backward()


def test_model_channels_last_bad_value():
    with pytest.raises(SETRConfigError, match=r"model\.channels_last: expected true or false, got 'yes'"):
        build_setr({**tiny_model_cfg("pup", 64, 5), "channels_last": "yes"})


def test_matrix_made_under_inference_mode_serves_a_later_training_step(monkeypatch):
    """A validation (Lightning: inference_mode) may build a matrix first; training then saves it for backward."""
    monkeypatch.setattr(resize_mod, "_CACHE", {})
    with torch.inference_mode():
        resize(torch.randn(1, 2, 8, 8), scale_factor=4)
    x = torch.randn(1, 2, 8, 8, requires_grad=True)
    resize(x, scale_factor=4).sum().backward()
    assert torch.allclose(x.grad, torch.full_like(x, 16.0))  # each input spreads weight 1 over 4x4 outputs
