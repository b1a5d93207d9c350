"""Speed features of issue 11 on tiny models: mixed precision, fused attention, activation checkpointing,
model.compile, automatically batched sliding windows."""

from __future__ import annotations

import pytest
import torch

from conftest import count_calls, count_sdpa_calls, model_cfg, tiny_model_cfg
from setr.checkpoint import ModelRecord
from setr.errors import SETRConfigError
from setr.inference import CPU_WINDOWS, auto_windows, infer
from setr.models import build_setr
from setr.training import SETRModule


def _net(*overrides: str, head: str = "naive", seed: int = 0):
    torch.manual_seed(seed)
    return build_setr(tiny_model_cfg(head, 32, 3, *overrides))


def _module(*overrides: str, **kw) -> SETRModule:
    torch.manual_seed(0)
    record = ModelRecord(model=tiny_model_cfg("naive", 32, 3, *overrides), class_names=["a", "b", "c"], palette=[],
                         crop_size=32)
    return SETRModule(record=record, **kw)


# ----------------------------------------------------------------------------------------- mixed precision
def test_bf16_autocast_training_step_has_fp32_loss_close_to_fp32():
    module = _module().train()
    x, y = torch.randn(2, 3, 32, 32), torch.randint(0, 3, (2, 32, 32))
    ref_out = module(x)
    ref_loss, _ = module.compute_loss(ref_out, y)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = module(x)
        loss, parts = module.compute_loss(out, y)
    assert out["out"].dtype == torch.bfloat16, "autocast did not run the network in bf16"
    assert loss.dtype == torch.float32 and all(p.dtype == torch.float32 for p in parts.values())
    loss.backward()
    assert torch.isfinite(module.model.decode_head.cls.weight.grad).all()
    assert torch.allclose(out["out"].float(), ref_out["out"], atol=0.1, rtol=0.05)
    assert torch.allclose(loss, ref_loss, rtol=0.02)


def test_bf16_eval_logits_are_fp32():
    module = _module().eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        (lg,) = module.predict_logits(x, [(32, 32)])
        slid = infer(module.model, x, {"mode": "slide", "crop_size": 16, "stride": 8})
    assert lg.dtype == torch.float32 and slid.dtype == torch.float32


@pytest.mark.slow
def test_lightning_bf16_mixed_trains_on_cpu(tmp_path):
    import lightning as L

    module = _module()
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 3, (4, 32, 32))
    loader = torch.utils.data.DataLoader([{"image": a, "mask": b} for a, b in zip(x, y)], batch_size=2)
    seen, ran = [], []

    class Spy(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen.append(outputs["loss"].dtype)

    # what the network itself ran in: the dtype of an encoder block's MLP output and of the decode logits
    hooks = [m.register_forward_hook(lambda m, i, o: ran.append(o.dtype))
             for m in (module.model.encoder.vit.blocks[0].mlp.fc1, module.model.decode_head)]
    trainer = L.Trainer(accelerator="cpu", precision="bf16-mixed", max_steps=2, logger=False, callbacks=[Spy()],
                        enable_checkpointing=False, enable_progress_bar=False, default_root_dir=tmp_path)
    trainer.fit(module, train_dataloaders=loader)
    for h in hooks:
        h.remove()
    assert seen == [torch.float32, torch.float32], "the loss is float32"
    assert ran == [torch.bfloat16] * 4, f"the network did not run in bf16: {ran}"


# ----------------------------------------------------------------------------------------- fused attention
def test_fused_attention_is_the_path_that_runs(monkeypatch):
    fused = _net("model.encoder.fused_attn=true").eval()
    math = _net("model.encoder.fused_attn=false").eval()
    assert fused.encoder.fused_attn and not math.encoder.fused_attn
    x = torch.randn(2, 3, 32, 32)
    calls = count_sdpa_calls(monkeypatch)
    with torch.no_grad():
        a = fused(x)
        assert calls[0] == fused.encoder.depth == 4
        b = math(x)
        assert calls[0] == 4, "the math path called scaled_dot_product_attention"
    assert torch.allclose(a, b, atol=1e-5)


def test_fused_attention_is_the_default_and_checked():
    assert _net().encoder.fused_attn
    with pytest.raises(SETRConfigError, match=r"model\.encoder\.fused_attn"):
        _net("model.encoder.fused_attn=maybe")


# ---------------------------------------------------------------------------------- activation checkpointing
@pytest.mark.parametrize(("value", "blocks"), [(False, []), (True, [0, 1, 2, 3]), (1, [0, 1, 2, 3]), (2, [0, 2]),
                                               (3, [0, 3]), (0, [])])
def test_grad_checkpointing_every_kth_block_same_gradients(monkeypatch, value, blocks):
    import torch.utils.checkpoint as cp

    ref = _net().train()
    net = _net(f"model.encoder.grad_checkpointing={str(value).lower()}").train()
    assert net.encoder.checkpointed_blocks == blocks
    calls = count_calls(monkeypatch, cp, "checkpoint")
    x = torch.randn(2, 3, 32, 32)
    grads = []
    for m in (ref, net):
        m(x)["out"].square().mean().backward()
        grads.append({n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None})
    assert calls[0] == len(blocks)
    assert grads[0].keys() == grads[1].keys()
    for n, g in grads[0].items():
        assert torch.allclose(g, grads[1][n], atol=1e-6), n
    calls[0] = 0
    with torch.no_grad():
        net.eval()(x)
    assert calls[0] == 0, "checkpointing in inference"


@pytest.mark.parametrize("bad", [-1, "2", 1.5])
def test_grad_checkpointing_bad_value(bad):
    from setr.models.encoder import ViTEncoder

    with pytest.raises(SETRConfigError, match=r"model\.encoder\.grad_checkpointing"):
        ViTEncoder("vit_tiny_patch16", img_size=32, arch={"embed_dim": 32, "depth": 2, "num_heads": 2},
                   grad_checkpointing=bad)


# ------------------------------------------------------------------------------------------- model.compile
def test_model_compile_key_leaves_the_record(monkeypatch):
    compiled = []
    monkeypatch.setattr(torch, "compile", lambda m, **kw: compiled.append(m) or m)
    module = _module("model.compile=true")
    assert compiled == [module.model] and module.hparams.compile is True
    assert "compile" not in module.record.model and "compile" not in module.hparams.record["model"]
    assert _module("model.compile=false").hparams.compile is False
    with pytest.raises(SETRConfigError, match=r"model\.compile"):
        _module("model.compile=yes")


def test_model_configs_carry_compile_and_train_yaml_does_not():

    for name in ("setr_small", "setr_naive", "setr_pup", "setr_mla"):
        assert model_cfg(f"model={name}")["compile"] is False


# ---------------------------------------------------------------------------------------- batched windows
@pytest.mark.parametrize("auto", [None, "auto"])
def test_slide_auto_batch_equals_one_window_at_a_time(monkeypatch, auto):
    net = _net().eval()
    x = torch.randn(2, 3, 48, 80)
    sizes = []
    real = net.forward
    monkeypatch.setattr(net, "forward", lambda t: sizes.append(t.shape[0]) or real(t))
    one = infer(net, x, {"mode": "slide", "crop_size": 32, "stride": 16, "batch_size": 1})
    assert set(sizes) == {2}
    sizes.clear()
    cfg = {"mode": "slide", "crop_size": 32, "stride": 16}
    if auto is not None:
        cfg["batch_size"] = auto
    got = infer(net, x, cfg)
    n_windows = 2 * 4
    assert max(sizes) > 2 and sum(sizes) == 2 * n_windows and max(sizes) == 2 * min(CPU_WINDOWS, n_windows)
    assert torch.allclose(one, got, atol=1e-5)


def test_auto_windows_picks_more_than_one_on_cpu_and_caps():
    net = _net().eval()
    x = torch.zeros(1, 3, 32, 32)
    assert auto_windows(net, x, (32, 32), 100) == CPU_WINDOWS > 1
    assert auto_windows(net, x, (32, 32), 3) == 3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_auto_windows_cuda_from_free_memory():
    net = _net().eval().cuda()
    x = torch.zeros(1, 3, 32, 32, device="cuda")
    assert auto_windows(net, x, (32, 32), 1000) > 1


@pytest.mark.parametrize("bad", [0, -2, "many", 1.5, True])
def test_slide_batch_size_bad_value(bad):
    net = _net().eval()
    with pytest.raises(SETRConfigError, match=r"data\.inference\.batch_size"):
        infer(net, torch.zeros(1, 3, 32, 32), {"mode": "slide", "crop_size": 16, "stride": 16, "batch_size": bad})
