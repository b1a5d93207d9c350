"""setr.models.attention: the recomputed attention weights equal timm's explicit (non-fused) ones; pixels map
to the right token through padding and prefix tokens."""

from __future__ import annotations

import pytest
import torch

from setr.models.attention import attention_weights, pixel_attention, token_index


def _explicit(model, images, block):
    """timm's non-fused path: attn_drop receives softmax(q k^T * scale) (identity in eval mode)."""
    attn = model.encoder.vit.blocks[block].attn
    seen = {}
    handle = attn.attn_drop.register_forward_hook(lambda m, a, out: seen.setdefault("w", out.detach()))
    fused, attn.fused_attn = attn.fused_attn, False
    try:
        with torch.no_grad():
            model(images)
    finally:
        attn.fused_attn = fused
        handle.remove()
    return seen["w"]


@pytest.mark.parametrize("head,prefix", [("naive", 1), ("mla", 0)])  # MLA drops the cls token before the blocks
def test_weights_equal_explicit_attention(tiny_setr, head, prefix):
    model = tiny_setr(head)
    images = torch.randn(2, 3, 50, 70)  # padded to 64x80 by SETR: a 4x5 grid
    with torch.no_grad():
        before = model(images)
    got = attention_weights(model, images, blocks=(0, -1))
    assert sorted(got) == [0, 3]
    n = prefix + 4 * 5
    heads = model.encoder.vit.blocks[0].attn.num_heads
    for block, w in got.items():
        assert w.shape == (2, heads, n, n)
        torch.testing.assert_close(w.sum(-1), torch.ones(2, heads, n))
        torch.testing.assert_close(w, _explicit(model, images, block), atol=1e-5, rtol=1e-4)
    for blk in model.encoder.vit.blocks:
        assert not blk.attn._forward_hooks, "hooks removed"
    with torch.no_grad():
        torch.testing.assert_close(model(images), before)


def test_pixel_to_token_accounts_for_prefix_and_padding(tiny_setr):
    naive, mla = tiny_setr("naive"), tiny_setr("mla")
    # 50x70 -> padded 64x80 -> 4 rows x 5 columns of 16x16 patches
    assert token_index(naive, 0, 0, (50, 70)) == (1, 0, 0)
    assert token_index(naive, 49, 69, (50, 70)) == (1 + 3 * 5 + 4, 3, 4)
    assert token_index(mla, 17, 33, (50, 70)) == (1 * 5 + 2, 1, 2)
    with pytest.raises(ValueError, match="outside"):
        token_index(naive, 50, 0, (50, 70))


@pytest.mark.parametrize("head", ["naive", "mla"])
def test_pixel_attention_map(tiny_setr, head):
    model = tiny_setr(head)
    image = torch.randn(3, 50, 70)
    pa = pixel_attention(model, image, y=20, x=40)
    assert pa.grid.shape == (4, 5) and pa.image.shape == (50, 70) and pa.block == 3
    assert (pa.row, pa.col) == (1, 2) and pa.token == pa.num_prefix + 7
    full = attention_weights(model, image[None], [-1])[3][0, :, pa.token].mean(0)
    torch.testing.assert_close(pa.grid.flatten(), full[pa.num_prefix:])
    assert pa.grid.sum().item() == pytest.approx(1 - pa.prefix_share, abs=1e-5)
    assert (pa.prefix_share == 0) == (head == "mla")
