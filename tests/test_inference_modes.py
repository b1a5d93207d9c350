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
    ms = infer(m, x, {"mode": "whole", "scales": [0.5, 1.0, 1.5], "flip": True}, out_size=(32, 48))
    assert ms.shape == plain.shape


@pytest.mark.parametrize("cfg, key", [({"mode": "tiles"}, "mode"), ({"mode": "slide", "crop_size": 32}, "stride"),
                                      ({"scales": [0]}, "scales")])
def test_bad_inference_config(cfg, key):
    with pytest.raises(SETRConfigError, match=f"data.inference.{key}"):
        infer(_model(), torch.randn(1, 3, 16, 16), cfg)
