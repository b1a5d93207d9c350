"""The fused loss path (setr.models.seg_loss.upsampled_cross_entropy, model.loss_path=fused): the values and
gradients of F.cross_entropy(F.interpolate(...)) without full-resolution logits; and a training step that never
waits for the device (the loss's finiteness is checked where Lightning syncs anyway)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from tests.conftest import tiny_model_cfg
from torch.utils._python_dispatch import TorchDispatchMode

from setr.checkpoint import ModelRecord
from setr.errors import SETRConfigError, TrainingDiverged
from setr.models.seg_loss import upsampled_cross_entropy
from setr.training import SETRModule

IGNORE = 255


def reference(x, target, size, align_corners):
    """What the fused path must equal: the logits resized to ``size``, cropped to the label, F.cross_entropy."""
    h, w = target.shape[-2:]
    up = F.interpolate(x, size=size, mode="bilinear", align_corners=align_corners)[..., :h, :w]
    return F.cross_entropy(up, target, ignore_index=IGNORE)


def _case(dtype, classes=5, low=(13, 17), label=(61, 47), seed=0, ignored=0.2, batch=2):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, classes, *low, generator=gen, dtype=torch.float64).to(dtype).requires_grad_()
    t = torch.randint(0, classes, (batch, *label), generator=gen)
    t[torch.rand(batch, *label, generator=gen) < ignored] = IGNORE
    return x, t


def _diffs(fn, x, t, size, ac, **kw):
    """(|loss - reference|, max |grad - reference grad|) of ``fn`` against :func:`reference`."""
    ref = reference(x, t, size, ac)
    (g_ref,) = torch.autograd.grad(ref, x)
    got = fn(x, t, size, align_corners=ac, **kw)
    (g,) = torch.autograd.grad(got, x)
    return (got - ref).abs().item(), (g - g_ref).abs().max().item(), got, ref


# sizes: odd low -> odd label (no padding); padded (resize to 64 x 48, crop to 61 x 47); no resize at all;
# a padded size that only crops (the PUP head's logits are at the input size already)
SIZES = [((13, 17), (61, 47), (61, 47)), ((13, 17), (61, 47), (64, 48)), ((16, 16), (16, 16), (16, 16)),
         ((16, 16), (13, 15), (16, 16)), ((4, 4), (64, 64), (64, 64))]
TOL = {torch.float64: 1e-10, torch.float32: 1e-5}


def check_exact(fn, dtype, ac, chunk_elems=None, classes=5):
    """Raise AssertionError unless ``fn`` equals :func:`reference` within :data:`TOL` on every size of SIZES."""
    kw = {} if chunk_elems is None else {"chunk_elems": chunk_elems}
    worst = 0.0
    for low, label, size in SIZES:
        x, t = _case(dtype, classes=classes, low=low, label=label)
        dv, dg, _, _ = _diffs(fn, x, t, size, ac, **kw)
        assert dv <= TOL[dtype] and dg <= TOL[dtype], (dtype, ac, low, label, size, dv, dg)
        worst = max(worst, dv, dg)
    return worst


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("align_corners", [False, True])
@pytest.mark.parametrize("chunk_elems", [None, 37])  # one band / a band of one row (37 < one row's elements)
# 5 classes: a CPU band normalised in NCHW (setr.models.seg_loss.CPU_SHORT_CLASSES); 19: over contiguous classes
@pytest.mark.parametrize("classes", [5, 19])
def test_values_and_gradients_equal_interpolate_then_cross_entropy(dtype, align_corners, chunk_elems, classes):
    check_exact(upsampled_cross_entropy, dtype, align_corners, chunk_elems, classes)


def test_the_exactness_check_fails_on_wrong_implementations():
    """check_exact rejects an implementation with align_corners flipped, one that resizes to the label size
    instead of the padded size, and one that forgets the ignore index: the tests above can fail."""
    def flipped(x, t, size, align_corners):
        return upsampled_cross_entropy(x, t, size, align_corners=not align_corners)

    def unpadded(x, t, size, align_corners):
        return upsampled_cross_entropy(x, t, None, align_corners=align_corners)

    def no_ignore(x, t, size, align_corners):
        return upsampled_cross_entropy(x, t.masked_fill(t == IGNORE, 0), size, align_corners=align_corners)

    for wrong in (flipped, unpadded, no_ignore):
        for ac in (False, True):
            with pytest.raises(AssertionError):
                check_exact(wrong, torch.float64, ac)


@pytest.mark.parametrize("align_corners", [False, True])
def test_gradcheck_float64(align_corners):
    x, t = _case(torch.float64, classes=3, low=(3, 4), label=(7, 9), ignored=0.3)

    def f(v):
        return upsampled_cross_entropy(v, t, (8, 10), align_corners=align_corners, chunk_elems=20)

    assert torch.autograd.gradcheck(f, (x,), eps=1e-6, atol=1e-8)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_all_ignored_batch_gives_nan_and_a_zero_gradient_as_cross_entropy(dtype):
    x, t = _case(dtype, ignored=1.0)
    assert (t == IGNORE).all()
    _, _, got, ref = _diffs(upsampled_cross_entropy, x, t, (64, 48), False)
    assert math.isnan(ref.item()) and math.isnan(got.item())
    (g,) = torch.autograd.grad(upsampled_cross_entropy(x, t, (64, 48)), x)
    assert torch.equal(g, torch.zeros_like(g))


@pytest.mark.parametrize("classes", [1, 4])
def test_one_class_images(classes):
    """Every labelled pixel of an image is one class (and with one class in all, the loss is 0)."""
    x, t = _case(torch.float64, classes=classes)
    t[0][t[0] != IGNORE] = 0
    t[1][t[1] != IGNORE] = classes - 1
    for ac in (False, True):
        dv, dg, got, _ = _diffs(upsampled_cross_entropy, x, t, (64, 48), ac)
        assert dv <= 1e-10 and dg <= 1e-10
        if classes == 1:
            assert got.item() == 0.0


def test_bf16_logits_match_the_float32_reference_within_bf16_precision():
    x32, t = _case(torch.float32, classes=6, low=(8, 8), label=(128, 128))
    x16 = x32.detach().to(torch.bfloat16).requires_grad_()
    x_ref = x16.detach().float().requires_grad_()
    ref = reference(x_ref, t, (128, 128), False)
    (g_ref,) = torch.autograd.grad(ref, x_ref)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the loss switches autocast off inside
        got = upsampled_cross_entropy(x16, t, chunk_elems=5000)
    (g,) = torch.autograd.grad(got, x16)
    assert got.dtype == torch.float32 and g.dtype == torch.bfloat16
    assert abs(got.item() - ref.item()) <= 1e-2 * abs(ref.item())
    assert (g.float() - g_ref).abs().max().item() <= 2e-2 * g_ref.abs().max().item()


def test_deterministic_and_independent_of_the_band_size():
    x, t = _case(torch.float32, low=(9, 11), label=(70, 50))
    torch.use_deterministic_algorithms(True)
    try:
        runs = []
        for chunk in (1 << 22, 1 << 22, 1000):
            loss = upsampled_cross_entropy(x, t, (72, 56), chunk_elems=chunk)
            (g,) = torch.autograd.grad(loss, x)
            runs.append((loss.detach(), g))
    finally:
        torch.use_deterministic_algorithms(False)
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])
    assert torch.allclose(runs[0][1], runs[2][1], atol=1e-7, rtol=0)


def test_channels_last_logits():
    x, t = _case(torch.float64, low=(9, 11), label=(70, 50))
    xc = x.detach().to(memory_format=torch.channels_last).requires_grad_()
    dv, dg, _, _ = _diffs(upsampled_cross_entropy, xc, t, (72, 56), False)
    assert dv <= 1e-10 and dg <= 1e-10


def test_bad_arguments_are_one_line():
    x, t = _case(torch.float32)
    with pytest.raises(ValueError, match="smaller than the label"):
        upsampled_cross_entropy(x, t, (32, 32))
    with pytest.raises(ValueError, match=r"expected logits \(B, C, h, w\)"):
        upsampled_cross_entropy(x[0], t)


# ------------------------------------------------------------------------------------------ the module
def _module(loss_path: str | None = "fused", head: str = "naive", crop: int = 64, classes: int = 5,
            **kw) -> SETRModule:
    torch.manual_seed(0)
    model = tiny_model_cfg(head, crop, classes)
    if loss_path is None:
        model.pop("loss_path", None)
    else:
        model["loss_path"] = loss_path
    record = ModelRecord(model=model, class_names=[str(i) for i in range(classes)], palette=[], crop_size=crop)
    return SETRModule(record=record, **kw)


@pytest.mark.parametrize("head", ["naive", "mla"])
def test_module_fused_loss_and_gradients_equal_the_reference_path(head):
    """A training step's loss, its parts and every parameter's gradient (decode and auxiliary heads, encoder) are
    the reference path's, with an input size that the network pads (60 x 52 -> 64 x 64) and crops back."""
    fused, ref = _module("fused", head).train(), _module("reference", head).train()
    ref.load_state_dict(fused.state_dict())
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 60, 52, generator=gen)
    y = torch.randint(0, 5, (2, 60, 52), generator=gen)
    y[:, :7] = IGNORE
    out_f, out_r = fused(x), ref(x)
    assert out_f["size"] == (64, 64) and out_f["crop"] == (60, 52) and out_f["out"].shape[-1] < 52
    assert out_r["out"].shape[-2:] == (60, 52)
    (loss_f, parts_f), (loss_r, parts_r) = fused.compute_loss(out_f, y), ref.compute_loss(out_r, y)
    assert len(parts_f) == len(parts_r) >= 2
    for k in parts_r:
        assert abs(parts_f[k].item() - parts_r[k].item()) <= 1e-5, k
    loss_f.backward()
    loss_r.backward()
    ref_params = dict(ref.named_parameters())
    for name, p in fused.named_parameters():
        if p.grad is not None or ref_params[name].grad is not None:
            assert torch.allclose(p.grad, ref_params[name].grad, atol=1e-5, rtol=1e-4), name


def test_loss_path_is_a_run_setting_and_eval_is_unchanged():
    """model.loss_path defaults to fused, is kept out of the checkpoint's record (like model.compile), a bad value
    is one line naming the key; eval outputs are the same logits whichever the loss path."""
    assert _module(None).loss_path == "fused"
    fused, ref = _module("fused"), _module("reference")
    assert "loss_path" not in fused.hparams["record"]["model"] and "loss_path" not in ref.hparams["record"]["model"]
    assert set(fused.state_dict()) == set(ref.state_dict())
    x = torch.randn(1, 3, 48, 40)
    fused.eval()
    ref.eval()
    assert torch.equal(fused(x), ref(x)) and torch.equal(fused.model(x, low_res=True), ref.model(x))
    with pytest.raises(SETRConfigError, match=r"^model\.loss_path: expected one of fused, reference, got 'fast'$"):
        _module("fast")


def test_schema_checks_model_loss_path():
    from omegaconf import OmegaConf

    from setr.utils.schema import check_types

    check_types(OmegaConf.create({"model": {"loss_path": "reference"}}))
    with pytest.raises(SETRConfigError, match=r"^model\.loss_path: expected one of fused, reference, got 'x'$"):
        check_types(OmegaConf.create({"model": {"loss_path": "x"}}))


# ------------------------------------------------------------------------------------ no host sync per step
class SyncCounter(TorchDispatchMode):
    """Counts the reads to the host (``.item()``, ``bool()``, ``float()``, ``.tolist()``:
    ``aten._local_scalar_dense``) of values computed since :meth:`new_step`: on a GPU each waits for the step's
    work. (A value computed in an earlier step and kept on the host, as the progress bar's, costs nothing.)"""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0
        self.fresh: set[int] = set()

    def new_step(self) -> int:
        count, self.count = self.count, 0
        self.fresh.clear()
        return count

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default and args[0].untyped_storage().data_ptr() in self.fresh:
            self.count += 1
        out = func(*args, **(kwargs or {}))
        if not func.is_view:  # a view (detach, ...) reads nothing new; in-place and out= ops write their storage
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor) and t.device.type != "meta":
                    self.fresh.add(t.untyped_storage().data_ptr())
        return out


def _loader(n: int = 64, size: int = 32, classes: int = 5):
    from torch.utils.data import DataLoader, Dataset

    class Data(Dataset):
        def __len__(self):
            return n

        def __getitem__(self, i):
            gen = torch.Generator().manual_seed(i)
            return {"image": torch.randn(3, size, size, generator=gen),
                    "mask": torch.randint(0, classes, (size, size), generator=gen)}

    return DataLoader(Data(), batch_size=2)


def _fit(module: SETRModule, max_steps: int, log_every: int, tmp_path, callbacks=()) -> None:
    import lightning as L
    from lightning.pytorch.loggers import CSVLogger

    trainer = L.Trainer(max_steps=max_steps, log_every_n_steps=log_every, limit_val_batches=0, logger=CSVLogger(
        tmp_path), callbacks=list(callbacks), enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=False, num_sanity_val_steps=0, accelerator="cpu", devices=1)
    trainer.fit(module, train_dataloaders=_loader())


@pytest.mark.parametrize("loss_path", ["fused", "reference"])
def test_no_host_sync_in_a_training_step_that_does_not_log(tmp_path, monkeypatch, loss_path):
    """Host reads of the step's values (:class:`SyncCounter`) and ``torch.cuda.synchronize`` calls per training
    step, from one batch's start to the next: none in the steps whose metrics are not logged (before: a ``bool()``
    of the loss's finiteness and the progress bar's ``.item()`` of ``train/loss`` every step)."""
    import lightning as L

    syncs = {"cuda": 0}
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: syncs.__setitem__("cuda", syncs["cuda"] + 1))
    counter = SyncCounter()
    marks: list[tuple[int, int]] = []

    class Record(L.Callback):  # what a step read, counted at the start of the next one (logging comes after the
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):  # batch-end hooks)
            count = counter.new_step()
            if batch_idx:
                marks.append((batch_idx - 1, count))

    module = _module(loss_path, crop=32).train()
    with counter:
        _fit(module, max_steps=9, log_every=4, tmp_path=tmp_path, callbacks=[Record()])
    reads = dict(marks)
    assert sorted(reads) == list(range(8))
    logged = {3, 7}  # log_every_n_steps=4: the 4th and 8th steps
    assert all(reads[s] == 0 for s in reads if s not in logged), sorted(reads.items())
    assert all(reads[s] > 0 for s in logged), reads  # the counter sees the reads Lightning's logging makes
    assert syncs["cuda"] == 0


class _NaNAt:
    """A forward hook making the decode head's logits NaN at global step ``step``."""

    def __init__(self, module: SETRModule, step: int) -> None:
        self.module, self.step = module, step
        module.model.decode_head.register_forward_hook(self)

    def __call__(self, mod, inputs, out):
        return out * float("nan") if self.module.global_step == self.step else out


@pytest.mark.parametrize(("step", "max_steps"), [(5, 20), (9, 10)])
def test_a_nan_loss_stops_the_run_naming_its_step(tmp_path, step, max_steps):
    """A NaN loss at step 5 (not a logged step: checked at step 7) or in the last step (checked when training ends)
    stops the run with the one line naming that step."""
    module = _module("fused", crop=32).train()
    _NaNAt(module, step)
    with pytest.raises(TrainingDiverged) as err:
        _fit(module, max_steps=max_steps, log_every=4, tmp_path=tmp_path)
    msg = str(err.value)
    assert "\n" not in msg and f"train/loss is nan at step {step}: training diverged" in msg, msg
    assert "optimizer.lr" in msg


def test_no_checkpoint_is_written_after_a_nan_loss(tmp_path):
    """A checkpoint due after the NaN step (every step here) raises instead: the last checkpoint on disk is the one
    before it. Without a trainer (direct compute_loss calls, as the bench makes) nothing is watched."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    module = _module("fused", crop=32).train()
    module._watch_finite(torch.tensor(float("nan")))
    assert getattr(module, "_nonfinite", None) is None
    _NaNAt(module, 1)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=1, save_top_k=-1, filename="{step}")
    import lightning as L

    trainer = L.Trainer(max_steps=6, log_every_n_steps=50, limit_val_batches=0, logger=False, callbacks=[ckpt],
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        accelerator="cpu", devices=1)
    with pytest.raises(TrainingDiverged, match="at step 1: training diverged"):
        trainer.fit(module, train_dataloaders=_loader())
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["step=1.ckpt"]


@pytest.mark.parametrize("align_corners", [False, True])
def test_band_rows_cover_every_weight(align_corners):
    """The band rows, computed from the sizes alone, hold every input row whose interpolation weight is non-zero
    (and at most one row more on each side), for upsampling, downsampling, odd sizes and crops."""
    from setr.models.resize import interp_matrix
    from setr.models.seg_loss import _band_inputs

    for h in (1, 2, 3, 7, 16, 32):
        for hp in (1, 5, 16, 33, 64, 128, 511):
            for ho in sorted({1, hp // 2 or 1, hp}):
                a = interp_matrix(h, hp, None, align_corners, torch.device("cpu"), torch.float64)[:, :ho] != 0
                for rows in (1, 3, 16):
                    for (lo, hi), r0 in zip(_band_inputs(h, hp, ho, align_corners, rows), range(0, ho, rows)):
                        used = a[:, r0:r0 + rows].any(1).nonzero().flatten().tolist()
                        assert 0 <= lo <= used[0] and used[-1] < hi <= h, (h, hp, ho, rows, r0)
                        assert used[0] - lo <= 1 and hi - 1 - used[-1] <= 1, (h, hp, ho, rows, r0)
