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
