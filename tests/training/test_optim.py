"""setr.training.optim: the poly schedule per parameter group, as mmcv's PolyLrUpdaterHook and mmengine's PolyLR.

Every group decays from its own base LR (``lr * lr_mult``) to the SAME ``min_lr``:
``lr_g(t) = (base_g - min_lr) * (1 - t / T) ** power + min_lr``, then the linear warmup scales it by
``1 - (1 - t / warmup) * (1 - warmup_ratio)``. The x10 head groups must not floor at 10 x min_lr.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from setr.training.optim import build_optimizer, build_scheduler

LR, MIN_LR, POWER, TOTAL = 0.01, 1e-4, 0.9, 100


class _Tiny(nn.Module):
    """Names as in SETR: ``decode_head.*`` trains at lr x head_lr_mult, the rest at lr."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Linear(4, 4)
        self.decode_head = nn.Linear(4, 2)


def _poly(base: float, t: int, min_lr: float = MIN_LR, total: int = TOTAL, power: float = POWER) -> float:
    return (base - min_lr) * (1 - min(t, total) / total) ** power + min_lr


def _schedule(sched: dict, lr: float = LR, mult: float = 10.0, total: int = TOTAL):
    """An SGD optimizer on the tiny model and its LR scheduler; ``lrs(step)`` gives {group name: lr}."""
    opt = build_optimizer(_Tiny(), {"name": "sgd", "lr": lr, "head_lr_mult": mult, "no_decay_norm_bias_pos": False})
    scheduler = build_scheduler(opt, sched, total, lr)
    return opt, scheduler


def _run(opt, scheduler, steps: int) -> dict[str, float]:
    for _ in range(steps):
        opt.step()
        scheduler.step()
    return {g["name"]: g["lr"] for g in opt.param_groups}


@pytest.mark.parametrize("step", [0, 1, 37, 50, 99, 100])
def test_every_group_decays_to_the_same_min_lr(step):
    opt, scheduler = _schedule({"name": "poly", "power": POWER, "min_lr": MIN_LR})
    lrs = _run(opt, scheduler, step)
    assert set(lrs) == {"head", "backbone"}
    assert lrs["backbone"] == pytest.approx(_poly(LR, step), rel=1e-12, abs=0)
    assert lrs["head"] == pytest.approx(_poly(10 * LR, step), rel=1e-12, abs=0)


def test_head_group_ends_at_exactly_min_lr_and_stays_there():
    opt, scheduler = _schedule({"name": "poly", "power": POWER, "min_lr": MIN_LR})
    mid = _run(opt, scheduler, TOTAL // 2)
    # at mid-run the x10 group is NOT ten times the backbone group: both carry the same min_lr offset
    assert mid["head"] == pytest.approx((10 * LR - MIN_LR) * 0.5**POWER + MIN_LR)
    assert mid["head"] != pytest.approx(10 * mid["backbone"])
    end = _run(opt, scheduler, TOTAL // 2)
    assert end == {"head": pytest.approx(MIN_LR, rel=1e-12), "backbone": pytest.approx(MIN_LR, rel=1e-12)}
    after = _run(opt, scheduler, 10)  # past the budget (e.g. an extra validation step): held at min_lr
    assert after == end


def test_linear_warmup_per_group():
    warm, ratio = 10, 0.1
    opt, scheduler = _schedule({"name": "poly", "power": POWER, "min_lr": MIN_LR, "warmup_steps": warm,
                                "warmup_ratio": ratio})
    done = 0
    for step in (0, 5, 10, 60):
        lrs = _run(opt, scheduler, step - done)
        done = step
        k = (1 - step / warm) * (1 - ratio) if step < warm else 0.0
        for name, base in (("backbone", LR), ("head", 10 * LR)):
            assert lrs[name] == pytest.approx(_poly(base, step) * (1 - k), rel=1e-12), (name, step)


def test_constant_schedule_keeps_each_groups_base_lr_after_warmup():
    opt, scheduler = _schedule({"name": "constant", "warmup_steps": 4, "warmup_ratio": 0.5})
    assert _run(opt, scheduler, 0) == {"backbone": pytest.approx(0.5 * LR), "head": pytest.approx(0.5 * 10 * LR)}
    for steps in (4, 50, 46):
        assert _run(opt, scheduler, steps) == {"backbone": pytest.approx(LR), "head": pytest.approx(10 * LR)}


def test_min_lr_guard_is_per_group():
    """A base LR below min_lr (tiny LRs in sweeps) would make that group's LR grow; such a group decays to 0
    instead, while a group whose base LR is above min_lr (the x10 head) still ends at min_lr."""
    lr = 5e-5  # backbone 5e-5 < min_lr 1e-4 < head 5e-4
    opt, scheduler = _schedule({"name": "poly", "power": POWER, "min_lr": MIN_LR}, lr=lr)
    mid = _run(opt, scheduler, TOTAL // 2)
    assert mid["backbone"] == pytest.approx(_poly(lr, TOTAL // 2, min_lr=0.0), rel=1e-12)
    assert mid["backbone"] < lr  # never above its base LR
    assert mid["head"] == pytest.approx(_poly(10 * lr, TOTAL // 2), rel=1e-12)
    end = _run(opt, scheduler, TOTAL // 2)
    assert end["backbone"] == 0.0 and end["head"] == pytest.approx(MIN_LR, rel=1e-12)


def test_schedule_resumes_exactly_from_its_state_dict():
    opt, scheduler = _schedule({"name": "poly", "power": POWER, "min_lr": MIN_LR})
    _run(opt, scheduler, 30)
    opt2, scheduler2 = _schedule({"name": "poly", "power": POWER, "min_lr": MIN_LR})
    opt2.load_state_dict(opt.state_dict())
    scheduler2.load_state_dict(scheduler.state_dict())
    assert _run(opt2, scheduler2, 20) == _run(opt, scheduler, 20)


def test_unknown_schedule_names_the_key():
    from setr.errors import SETRConfigError

    opt = torch.optim.SGD(_Tiny().parameters(), lr=LR)
    with pytest.raises(SETRConfigError, match=r"^optimizer.scheduler.name: unknown schedule 'cosine'"):
        build_scheduler(opt, {"name": "cosine"}, TOTAL, LR)


# ------------------------------------------------------------------------------ fine-tuning options (issue 10)
def _vit_setr(head: str = "naive"):
    import torch

    from conftest import tiny_model_cfg
    from setr.models import build_setr

    torch.manual_seed(0)
    return build_setr(tiny_model_cfg(head, 64, 5))


def test_layer_decay_scales_each_encoder_layer():
    from setr.training.optim import build_optimizer, encoder_layer_id

    model = _vit_setr()
    depth = len(model.encoder.vit.blocks)  # 4
    opt = build_optimizer(model, {"name": "sgd", "lr": 0.01, "head_lr_mult": 10.0, "layer_decay": 0.5})
    lr_of = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    names = dict(model.named_parameters())
    assert lr_of[id(names["encoder.vit.blocks.3.attn.qkv.weight"])] == pytest.approx(0.01 * 0.5)
    assert lr_of[id(names["encoder.vit.blocks.0.attn.qkv.weight"])] == pytest.approx(0.01 * 0.5 ** 4)
    assert lr_of[id(names["encoder.vit.patch_embed.proj.weight"])] == pytest.approx(0.01 * 0.5 ** 5)
    assert lr_of[id(names["encoder.vit.pos_embed"])] == pytest.approx(0.01 * 0.5 ** 5)
    assert lr_of[id(names["decode_head.cls.weight"])] == pytest.approx(0.1), "heads: x10, no decay"
    for name, p in names.items():  # every trainable parameter in exactly one group, at its layer's LR
        layer = encoder_layer_id(name, depth)
        want = 0.01 * (10.0 if "head" in name else 1.0) * 0.5 ** (depth + 1 - layer)
        assert lr_of[id(p)] == pytest.approx(want), name
    assert sum(len(g["params"]) for g in opt.param_groups) == len(names)
    # without layer_decay: the two head groups and the two backbone groups of the recipe
    plain = build_optimizer(model, {"name": "sgd", "lr": 0.01, "head_lr_mult": 10.0})
    assert sorted(g["name"] for g in plain.param_groups) == ["backbone", "backbone_no_decay", "head", "head_no_decay"]


def test_layer_decay_rejects_bad_values():
    from setr.errors import SETRConfigError
    from setr.training.optim import build_optimizer

    for bad in (0, 1.5, -0.9, True):
        with pytest.raises(SETRConfigError, match=r"optimizer.layer_decay"):
            build_optimizer(_vit_setr(), {"name": "sgd", "lr": 0.01, "layer_decay": bad})


def test_frozen_encoder_has_no_group_and_heads_bn_still_train():
    import torch

    from conftest import tiny_model_cfg
    from setr.checkpoint import ModelRecord
    from setr.training import SETRModule

    model = tiny_model_cfg("mla", 64, 5, "model.encoder.freeze=true")
    record = ModelRecord(model=model, class_names=[], palette=[], crop_size=64)
    module = SETRModule(record=record, optimizer={"name": "sgd", "lr": 0.01, "head_lr_mult": 10.0}).train()
    from setr.training.optim import build_optimizer

    opt = build_optimizer(module.model, module.hparams.optimizer)
    in_groups = {id(p) for g in opt.param_groups for p in g["params"]}
    enc = list(module.model.encoder.parameters())
    assert enc and not any(p.requires_grad for p in enc) and not any(id(p) in in_groups for p in enc)
    neck = list(module.model.neck.parameters())
    assert all(id(p) in in_groups for p in neck), "the MLA neck is not part of the frozen encoder"
    bn = next(m for m in module.model.decode_head.modules() if isinstance(m, torch.nn.BatchNorm2d))
    before = bn.running_mean.clone()
    out = module.model(torch.randn(2, 3, 64, 64))
    loss, _ = module.compute_loss(out, torch.randint(0, 5, (2, 64, 64)))
    loss.backward()
    assert not torch.equal(bn.running_mean, before), "the heads' BatchNorm statistics update"
    assert all(p.grad is None for p in enc)
