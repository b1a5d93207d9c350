"""Inference modes: slide vs whole, batched vs single windows, flip TTA, errors."""

import pytest
import torch

from setr.errors import SETRConfigError
from setr.inference import infer


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 1), torch.nn.ReLU(), torch.nn.Conv2d(8, 5, 1)).eval()


def test_slide_equals_whole_when_one_window_covers_the_image():
    m, x = _model(), torch.randn(1, 3, 40, 56)
    whole = infer(m, x, {"mode": "whole"})
    one = infer(m, x, {"mode": "slide", "crop_size": 64, "stride": 48})  # image smaller than the crop: padded
    assert one.shape == whole.shape == (1, 5, 40, 56)
    torch.testing.assert_close(one, whole)


def test_batched_windows_equal_single_windows_and_overlaps_average():
    tiny = _model()
    from setr.models import build_setr

    net = build_setr({"num_classes": 3, "encoder": {"name": "vit_tiny_patch16", "img_size": 32,
                                                    "arch": {"embed_dim": 32, "depth": 1, "num_heads": 2}},
                      "head": {"decode": {"type": "up", "channels": 8, "kernel_size": 1, "up_scales": [1]}}}).eval()
    x = torch.randn(2, 3, 48, 80)
    a = infer(net, x, {"mode": "slide", "crop_size": 32, "stride": 16, "batch_size": 1})
    b = infer(net, x, {"mode": "slide", "crop_size": 32, "stride": 16, "batch_size": 5})
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert a.shape == (2, 3, 48, 80)
    # a pointwise model gives the same logits whatever the windows
    torch.testing.assert_close(infer(tiny, x, {"mode": "slide", "crop_size": 32, "stride": 16}), tiny(x))


def test_flip_tta_of_flip_equivariant_model_equals_plain():
    m, x = _model(), torch.randn(1, 3, 32, 48)
    plain = infer(m, x, {"mode": "whole"})
    torch.testing.assert_close(infer(m, x, {"mode": "whole", "flip": True}), plain)


class _SizeAndColumn(torch.nn.Module):
    """Logits that are a known function of the input size and of the horizontal position, whatever the pixels:
    channel 0 is ``w / 100 + h / 1000`` everywhere (a different constant at every scale), channel 1 the column
    index ``0 .. w-1`` of the map the model is given (so a flip that is not undone shows)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        size = torch.full((b, 1, h, w), w / 100 + h / 1000, dtype=x.dtype)
        column = torch.arange(w, dtype=x.dtype).expand(b, 1, h, w)
        return torch.cat([size, column], dim=1)


def _expected_ms_flip(scales, h: int, w: int, out_size) -> torch.Tensor:
    """The multi-scale + flip average of :class:`_SizeAndColumn`, in closed form.

    At scale ``s`` the model sees ``(h*s, w*s)`` (sizes chosen so these are integers). Channel 0 is a constant:
    the bilinear resize to ``out_size`` keeps it. Channel 1 is the ramp ``j`` without flip and, once the flipped
    prediction is flipped back, ``w*s - 1 - j`` with flip: bilinear resizing is linear, so the two resized ramps
    add up to the resized constant ``w*s - 1``, i.e. the pair averages to ``(w*s - 1) / 2`` everywhere.
    """
    size = sum((w * s) / 100 + (h * s) / 1000 for s in scales) / len(scales)
    column = sum((w * s - 1) / 2 for s in scales) / len(scales)
    return torch.tensor([size, column]).view(1, 2, 1, 1).expand(1, 2, *out_size)


@pytest.mark.parametrize("scales", [[1.0], [0.5, 1.0], [0.5, 1.0, 1.5], [0.75, 1.5]])
def test_multi_scale_flip_averages_known_values(scales):
    x = torch.randn(1, 3, 32, 48)
    out_size = (40, 60)  # not the input size: every prediction is resized back
    got = infer(_SizeAndColumn(), x, {"mode": "whole", "scales": scales, "flip": True}, out_size=out_size)
    torch.testing.assert_close(got, _expected_ms_flip(scales, 32, 48, out_size), atol=1e-5, rtol=1e-6)


def test_a_scale_that_changes_the_logits_is_really_averaged():
    x, model = torch.randn(1, 3, 32, 48), _SizeAndColumn()
    one = infer(model, x, {"mode": "whole", "scales": [1.0], "flip": True})
    two = infer(model, x, {"mode": "whole", "scales": [0.5, 1.0], "flip": True})
    assert not torch.allclose(one, two)
    # the mean of the per-scale results, not their sum nor the last one
    half = _expected_ms_flip([0.5], 32, 48, (32, 48))
    torch.testing.assert_close(two, (one + half) / 2, atol=1e-5, rtol=1e-6)
    # without flip, scale 1 at the input size returns the model's own ramp untouched
    plain = infer(model, x, {"mode": "whole", "scales": [1.0]})
    torch.testing.assert_close(plain, model(x))


@pytest.mark.parametrize("cfg, key", [({"mode": "tiles"}, "mode"), ({"mode": "slide", "crop_size": 32}, "stride"),
                                      ({"scales": [0]}, "scales")])
def test_bad_inference_config(cfg, key):
    with pytest.raises(SETRConfigError, match=f"data.inference.{key}"):
        infer(_model(), torch.randn(1, 3, 16, 16), cfg)


class _Spy(torch.nn.Module):
    """Records the size of every input; logits: channel 0 = input width / 100 everywhere, channel 1 = 0."""

    def __init__(self) -> None:
        super().__init__()
        self.sizes: list[tuple[int, int]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.sizes.append(tuple(x.shape[-2:]))
        b, _, h, w = x.shape
        return torch.cat([torch.full((b, 1, h, w), w / 100.0), torch.zeros(b, 1, h, w)], 1)


def test_official_multi_scale_sizes_are_mmseg_keep_ratio_with_setr_min_short():
    """The official SETR MS test (MultiScaleFlipAug + Resize(keep_ratio, setr_multi_scale)) on a 100x150 image with
    img_scale (64, 32), crop 40, ratios 0.5 / 1.0 / 1.5, by hand:
      r=0.5 -> scale (32, 16): short 16 < 40 -> short side 40: factor 0.4 -> 40 x 60
      r=1.0 -> scale (64, 32): short 32 < 40 -> 40 x 60 again
      r=1.5 -> scale (96, 48): short 48 -> factor 0.48 -> 48 x 72 (the long side is not capped at 96)
    Without min_short (mmseg's plain keep-ratio Resize): factor min(long'/150, short'/100):
      r=0.5 -> min(32/150, 16/100) = 0.16 -> 16 x 24;  r=1.5 -> min(96/150, 48/100) = 0.48 -> 48 x 72."""
    x = torch.zeros(1, 3, 100, 150)
    cfg = {"mode": "whole", "scales": [0.5, 1.0, 1.5], "img_scale": [64, 32], "min_short": 40}
    spy = _Spy()
    infer(spy, x, cfg)
    assert spy.sizes == [(40, 60), (40, 60), (48, 72)]
    spy = _Spy()
    infer(spy, x, {**cfg, "min_short": None, "flip": True})
    assert spy.sizes == [(16, 24), (16, 24), (32, 48), (32, 48), (48, 72), (48, 72)]


def test_probability_average_is_the_log_of_the_mean_softmax():
    """average=probs (mmseg's aug_test): per scale softmax([w/100, 0]) at the output size, then the mean; by hand
    for widths 60, 60, 72: p0 = mean(sigmoid(0.6), sigmoid(0.6), sigmoid(0.72))."""
    import math

    x = torch.zeros(1, 3, 100, 150)
    cfg = {"mode": "whole", "scales": [0.5, 1.0, 1.5], "img_scale": [64, 32], "min_short": 40, "average": "probs"}
    out = infer(_Spy(), x, cfg, out_size=(10, 15))
    sig = lambda v: 1 / (1 + math.exp(-v))
    p0 = (2 * sig(0.6) + sig(0.72)) / 3
    assert out.shape == (1, 2, 10, 15)
    torch.testing.assert_close(out[0, 0], torch.full((10, 15), math.log(p0)))
    torch.testing.assert_close(out[0, 1], torch.full((10, 15), math.log(1 - p0)))
    # averaging logits instead gives another number: the two protocols really differ
    logits = infer(_Spy(), x, {**cfg, "average": "logits"}, out_size=(10, 15))
    assert abs(float(logits[0, 0, 0, 0]) - (0.6 + 0.6 + 0.72) / 3) < 1e-6


@pytest.mark.parametrize(("key", "value", "message"), [
    ("average", "mean", "data.inference.average"),
    ("min_short", 0, "data.inference.min_short"),
    ("img_scale", [0, 5], "data.inference.img_scale"),
])
def test_protocol_keys_are_checked(key, value, message):
    cfg = {"mode": "whole", "img_scale": [64, 32], key: value}
    with pytest.raises(SETRConfigError, match=message):
        infer(_Spy(), torch.zeros(1, 3, 8, 8), cfg)


def test_min_short_needs_img_scale():
    with pytest.raises(SETRConfigError, match=r"data.inference.min_short: needs data.inference.img_scale"):
        infer(_Spy(), torch.zeros(1, 3, 8, 8), {"min_short": 4})
