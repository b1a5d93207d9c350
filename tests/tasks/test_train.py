"""End-to-end tests of src/train.py and src/eval.py, and unit tests of the training wiring."""

from __future__ import annotations

import csv
import dataclasses
import json
import warnings
from pathlib import Path

import pytest
import torch

import setr
from pipeline import TINY, last_json, run_entry
from setr.checkpoint import ModelRecord
from setr.training.datamodule import EpochSampler, collate
from setr.training.module import SETRModule
from setr.training.optim import build_optimizer, param_groups, poly_factor


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """One short training run shared by several tests: 6 steps, validation every 3."""
    log_dir = tmp_path_factory.mktemp("logs")
    run_dir = log_dir / "run"
    proc = run_entry("train.py", *TINY, "trainer.max_steps=6", "trainer.val_check_interval=3",
                     f"hydra.run.dir={run_dir}", log_dir=log_dir)
    return proc, run_dir


@pytest.mark.slow
def test_train_writes_metrics_checkpoints_and_per_class_csv(trained_run):
    proc, run_dir = trained_run
    metrics = last_json(proc)
    for key in ("val/mIoU", "val/mAcc", "val/aAcc", "val/IoU/background", "train/loss"):
        assert key in metrics, key
    assert 0.0 <= metrics["val/mIoU"] <= 1.0
    assert metrics["global_step"] == 6
    assert json.loads((run_dir / "metrics.json").read_text()) == pytest.approx(metrics, nan_ok=True)
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert list((run_dir / "checkpoints").glob("step_*.ckpt")), "best checkpoint by val/mIoU"
    rows = list(csv.DictReader(Path(run_dir / "csv" / "metrics.csv").read_text().splitlines()))
    header = rows[0].keys()
    assert {"val/IoU/background", "val/IoU/disc", "val/mIoU"} <= set(header)
    assert (run_dir / ".hydra" / "config.yaml").is_file()
    # the report of the last validation: per-class CSV / JSON and the confusion matrix
    report = json.loads((run_dir / "val_scores.json").read_text())
    assert report["mIoU"] == pytest.approx(metrics["val/mIoU"], abs=1e-6)
    assert [r["class"] for r in report["per_class"]] == ["background", "disc", "rectangle", "triangle"]
    assert (run_dir / "val_confusion.png").stat().st_size > 1000 and (run_dir / "val_scores.csv").is_file()
    assert "val scores" in proc.stdout


@pytest.mark.slow
def test_checkpoint_loads_without_arguments_and_eval_matches(trained_run, tmp_path):
    _, run_dir = trained_run
    last = run_dir / "checkpoints" / "last.ckpt"
    ckpt = torch.load(last, map_location="cpu", weights_only=True)  # tensors and plain values only
    assert ckpt["config"]["model"]["encoder"]["name"] == "vit_tiny_patch16", "resolved config inside the checkpoint"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        module = SETRModule.load_from_checkpoint(str(last), map_location="cpu", weights_only=True)
    assert module.record.class_names == ["background", "disc", "rectangle", "triangle"]
    model = setr.load_model(last)
    assert not model.training and model.record.num_classes == 4 and len(model.record.palette) == 4
    assert model.record.crop_size == [64, 64] and model.record.inference == {"mode": "whole"}
    assert all(torch.equal(v, module.model.state_dict()[k]) for k, v in model.state_dict().items())
    # no Lightning: the network alone, at an input size it never saw (not a multiple of the patch size)
    with torch.no_grad():
        x = torch.randn(2, 3, 50, 71)
        assert model(x).shape == (2, 4, 50, 71)
        assert torch.allclose(model(x), module.model.eval()(x))

    # eval.py on the final weights reproduces the last validation of training exactly
    final_val = json.loads((run_dir / "metrics.json").read_text())["val/mIoU"]
    proc = run_entry("eval.py", *TINY, f"ckpt_path={last}",
                     f"hydra.run.dir={tmp_path / 'eval'}", log_dir=tmp_path)
    out = last_json(proc)
    assert out["val/mIoU"] == pytest.approx(final_val, abs=1e-6)
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["val/mIoU"] == pytest.approx(out["val/mIoU"])
    assert json.loads((tmp_path / "eval" / "val_scores.json").read_text())["mIoU"] == pytest.approx(out["val/mIoU"])
    assert (tmp_path / "eval" / "val_confusion.png").is_file() and (tmp_path / "eval" / "val_confusion.csv").is_file()


@pytest.mark.slow
def test_resume_is_exact(tmp_path):
    """9 steps straight == 3 steps (schedule spanning 9) + resume to 9: same step, same final loss."""
    common = [*TINY, "trainer.val_check_interval=3"]
    straight = last_json(run_entry("train.py", *common, "trainer.max_steps=9", f"hydra.run.dir={tmp_path / 'a'}",
                                   log_dir=tmp_path))
    run_entry("train.py", *common, "trainer.max_steps=3", "optimizer.scheduler.total_steps=9",
              f"hydra.run.dir={tmp_path / 'b'}", log_dir=tmp_path)
    resumed = last_json(run_entry("train.py", *common, "trainer.max_steps=9", f"hydra.run.dir={tmp_path / 'b'}",
                                  f"ckpt_path={tmp_path / 'b' / 'checkpoints' / 'last.ckpt'}", log_dir=tmp_path))
    assert resumed["global_step"] == straight["global_step"] == 9
    assert resumed["train/loss"] == pytest.approx(straight["train/loss"], rel=1e-5)
    assert resumed["val/mIoU"] == pytest.approx(straight["val/mIoU"], abs=1e-6)


@pytest.mark.slow
def test_run_ending_between_validations_validates_its_final_weights(tmp_path):
    """max_steps=4 with validation every 3 steps: the run validates at step 4 too, so the final JSON line, the
    report and last.ckpt all describe the final weights."""
    run_dir = tmp_path / "r"
    proc = run_entry("train.py", *TINY, "trainer.max_steps=4", "trainer.val_check_interval=3",
                     f"hydra.run.dir={run_dir}", log_dir=tmp_path)
    metrics = last_json(proc)
    assert metrics["global_step"] == 4 and "val/mIoU" in metrics and "val/IoU/disc" in metrics
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("step_*.ckpt")) in (
        ["step_000003.ckpt"], ["step_000004.ckpt"])
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 4
    report = json.loads((run_dir / "val_scores.json").read_text())
    assert report["mIoU"] == pytest.approx(metrics["val/mIoU"], abs=1e-6)
    assert proc.stdout.count("val scores (step") == 1, "one report table, for the final validation"
    lines = (run_dir / "csv" / "metrics.csv").read_text().splitlines()
    rows = [r for r in csv.DictReader(lines) if r.get("val/mIoU")]
    assert [int(r["step"]) for r in rows] == [2, 3], "validations after steps 3 and 4 (0-based logging steps)"


@pytest.mark.slow
def test_unknown_model_is_one_error_line(tmp_path):
    proc = run_entry("train.py", "model=nope", log_dir=tmp_path, check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: In 'train': Could not find 'model/nope'; available: setr_mla, setr_naive, setr_pup, setr_small"]


@pytest.mark.slow
@pytest.mark.parametrize(
    "override, message",
    [
        ("optimizer.lr=-0.1", "optimizer.lr: must be a positive number"),
        ("data=pascal_context", "pascal_context: dataset root"),
        ("data.name=nope", "data.name: unknown dataset 'nope'"),
    ],
)
def test_bad_config_gives_one_clear_line(tmp_path, override, message):
    # a real dataset config has no synthetic-only keys (data.dataset.image_size, ...): keep only the generic overrides
    base = [o for o in TINY if not o.startswith("data.")] if override.startswith("data=") else TINY
    proc = run_entry("train.py", *base, override, "trainer.max_steps=1", f"hydra.run.dir={tmp_path / 'x'}",
                     log_dir=tmp_path, check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], proc.stderr[-2000:]


# --------------------------------------------------------------------------------------------- units
def _tiny_module(**kw) -> SETRModule:
    from setr.models import build_setr  # noqa: F401  (import check)

    model = {
        "norm": "bn",
        "encoder": {"name": "vit_tiny_patch16", "img_size": 32, "arch": {"embed_dim": 32, "depth": 2, "num_heads": 2}},
        "head": {"decode": {"type": "up", "in_index": -1, "channels": 16, "kernel_size": 1, "up_scales": [1]},
                 "auxiliary": {"type": "up", "in_index": [0], "channels": 16, "kernel_size": 1, "up_scales": [1]}},
    }
    record = ModelRecord(model={**model, "num_classes": 3}, class_names=["a", "b", "c"], palette=[], crop_size=32)
    return SETRModule(record=record, optimizer={"name": "sgd", "lr": 0.01, "head_lr_mult": 10.0}, **kw)


def test_param_groups_head_multiplier_and_no_decay():
    module = _tiny_module()
    groups = param_groups(module.model, lr=0.01, weight_decay=0.05, head_lr_mult=10.0)
    by_name = {g["name"]: g for g in groups}
    assert by_name["head"]["lr"] == pytest.approx(0.1) and by_name["backbone"]["lr"] == pytest.approx(0.01)
    names = {id(p): n for n, p in module.model.named_parameters()}
    no_decay = {names[id(p)] for g in groups if g["weight_decay"] == 0.0 for p in g["params"]}
    assert "encoder.vit.pos_embed" in no_decay and "encoder.vit.cls_token" in no_decay
    assert any(n.endswith("norm1.weight") for n in no_decay) and any(n.endswith(".bias") for n in no_decay)
    assert "encoder.vit.blocks.0.attn.qkv.weight" not in no_decay
    heads = {names[id(p)] for g in groups if g["lr_mult"] == 10.0 for p in g["params"]}
    assert heads and all("head" in n for n in heads)
    assert sum(len(g["params"]) for g in groups) == len(list(module.model.parameters()))


def test_poly_schedule_matches_mmcv_formula():
    base, min_lr, total = 0.01, 1e-4, 100
    for step in (0, 10, 50, 99, 100, 150):
        expected = (base - min_lr) * (1 - min(step, total) / total) ** 0.9 + min_lr
        assert poly_factor(step, total, 0.9, base, min_lr) * base == pytest.approx(expected)
    # linear warmup from base * ratio
    assert poly_factor(0, total, 0.9, base, min_lr, warmup_steps=10, warmup_ratio=0.1) == pytest.approx(
        0.1 * ((base - min_lr) + min_lr) / base)


def test_optimizer_rejects_bad_values():
    from setr.errors import SETRConfigError

    module = _tiny_module()
    with pytest.raises(SETRConfigError, match=r"optimizer.lr"):
        build_optimizer(module.model, {"name": "sgd", "lr": 0})
    with pytest.raises(SETRConfigError, match=r"optimizer.name"):
        build_optimizer(module.model, {"name": "lion", "lr": 0.1})


def test_epoch_sampler_shards_cover_everything_once():
    n = 11
    shards = [list(EpochSampler(n, shuffle=False, world=3, rank=r)) for r in range(3)]
    assert sorted(i for shard in shards for i in shard) == list(range(n))
    a, b = EpochSampler(n, shuffle=True, seed=3), EpochSampler(n, shuffle=True, seed=3)
    a.set_epoch(1), b.set_epoch(1)
    assert list(a) == list(b)
    b.set_epoch(2)
    assert list(a) != list(b)
    c = EpochSampler(n, shuffle=True, seed=3)
    c.set_epoch(1)
    c.start = 4
    assert list(c) == list(a)[4:]


def test_collate_keeps_lists_for_mixed_sizes():
    same = collate([{"image": torch.zeros(3, 4, 4), "mask": torch.zeros(4, 4), "index": 0}] * 2)
    assert same["image"].shape == (2, 3, 4, 4) and same["index"].tolist() == [0, 0]
    mixed = collate([{"mask": torch.zeros(4, 4)}, {"mask": torch.zeros(5, 4)}])
    assert isinstance(mixed["mask"], list) and len(mixed["mask"]) == 2


def _tiny_compiled_module() -> SETRModule:
    """The tiny module with ``model.compile: true`` in its model config (the key src/train.py passes on)."""
    record = _tiny_module().record
    compiled = SETRModule(record=dataclasses.replace(record, model={**record.model, "compile": True}),
                          optimizer={"name": "sgd", "lr": 0.01, "head_lr_mult": 10.0})
    assert compiled.hparams.compile is True and "compile" not in compiled.hparams.record["model"]
    return compiled


def test_compiled_checkpoint_loads_into_uncompiled_model(tmp_path):
    module = _tiny_compiled_module()
    assert not any("_orig_mod" in k for k in module.state_dict()), "compiled wrapper is not a registered submodule"
    # a checkpoint written by other tools from a compiled model carries the prefix
    state = {k.replace("model.", "model._orig_mod.", 1): v for k, v in module.state_dict().items()}
    path = tmp_path / "compiled.ckpt"
    torch.save({"state_dict": state, "hyper_parameters": dict(module.hparams)}, path)
    model = setr.load_model(path)
    ref = module.model.state_dict()
    assert all(torch.equal(v, ref[k]) for k, v in model.state_dict().items())
    assert model.record.num_classes == 3


@pytest.mark.slow
def test_compile_really_compiles_and_trains_a_step():
    """model.compile=true: torch.compile (inductor, CPU) compiles the network and a training step runs through the
    compiled code, giving the eager step's loss and gradients."""
    import torch._dynamo

    torch._dynamo.reset()
    torch.manual_seed(0)
    compiled = _tiny_compiled_module().train()
    eager = _tiny_module().train()
    eager.load_state_dict(compiled.state_dict())
    x, y = torch.randn(2, 3, 32, 32), torch.randint(0, 3, (2, 32, 32))
    counts = torch._dynamo.utils.counters
    counts.clear()
    losses, grads = [], []
    for m in (compiled, eager):
        loss, _ = m.compute_loss(m(x), y)
        loss.backward()
        losses.append(loss.detach())
        grads.append(m.model.decode_head.cls.weight.grad.clone())
    assert counts["stats"]["unique_graphs"] >= 1, "torch.compile produced no graph"
    assert sum(counts["inductor"].values()) > 0 or counts["aot_autograd"]["total"] > 0, "nothing was compiled"
    assert torch.allclose(losses[0], losses[1], atol=1e-5)
    assert torch.allclose(grads[0], grads[1], atol=1e-5)


def test_load_model_errors(tmp_path):
    from setr.errors import SETRConfigError

    with pytest.raises(SETRConfigError, match="not found"):
        setr.load_model(tmp_path / "missing.ckpt")
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(SETRConfigError, match=r"bad.ckpt"):
        setr.load_model(bad)
    # a file that needs arbitrary unpickling is refused, not executed
    pickled = tmp_path / "pickled.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"record": {}}, "obj": Path("x")}, pickled)
    with pytest.raises(SETRConfigError, match=r"pickled.ckpt.*not unpickled"):
        setr.load_model(pickled)
    foreign = tmp_path / "foreign.ckpt"
    torch.save({"state_dict": {}}, foreign)
    with pytest.raises(SETRConfigError, match=r"foreign.ckpt is not a checkpoint written by setr-train"):
        setr.load_model(foreign)


@pytest.mark.slow
def test_resume_auto_continues_the_newest_run_of_the_same_experiment(tmp_path):
    """resume=auto picks the newest run with the same task / experiment / model / data, not the newest run."""
    runs = tmp_path / "train" / "runs"
    run_entry("train.py", *TINY, "trainer.max_steps=2", "trainer.val_check_interval=2",
              f"hydra.run.dir={runs / 'small'}", log_dir=tmp_path)
    run_entry("train.py", "model=setr_naive", *TINY, "trainer.max_steps=1", f"hydra.run.dir={runs / 'naive'}",
              log_dir=tmp_path)  # newer, another model
    proc = run_entry("train.py", *TINY, "resume=auto", "trainer.max_steps=4", "trainer.val_check_interval=2",
                     log_dir=tmp_path)
    assert f"resume=auto: continuing {runs / 'small'} (model=setr_small data=synthetic)" in proc.stderr
    assert last_json(proc)["global_step"] == 4
    assert json.loads((runs / "small" / "metrics.json").read_text())["global_step"] == 4
    assert sorted(p.name for p in runs.iterdir()) == ["naive", "small"], "no new run folder"

    fresh = run_entry("train.py", "model=setr_pup", *TINY, "resume=auto", "train=false", log_dir=tmp_path)
    assert "resume=auto: no train run of model=setr_pup data=synthetic with a last.ckpt under" in fresh.stderr
    assert "starting a new run" in fresh.stderr
    assert len(list(runs.iterdir())) == 3


@pytest.mark.slow
def test_eval_prints_the_published_number_beside_the_measured_one(trained_run, tmp_path):
    """A paper preset's `published` node: eval.py's JSON carries it and the difference, for the protocol it ran
    (ss: one scale, no flip; ms: the official multi-scale + flip test, protocol=ms)."""
    _, run_dir = trained_run
    last = run_dir / "checkpoints" / "last.ckpt"
    pub = "+published={ss: 50.0, ms: 60.0, source: 'official SETR README'}"
    ss = run_entry("eval.py", *TINY, f"ckpt_path={last}", pub, log_dir=tmp_path)
    out = last_json(ss)
    assert out["published/mIoU"] == pytest.approx(0.5) and out["published/protocol"] == "ss"
    assert out["diff/mIoU"] == pytest.approx(out["val/mIoU"] - 0.5)
    assert f"mIoU {100 * out['val/mIoU']:.2f} measured, 50.00 published (SS, official SETR README)" in ss.stdout
    ms = last_json(run_entry("eval.py", *TINY, f"ckpt_path={last}", pub, "protocol=ms", log_dir=tmp_path))
    assert ms["published/mIoU"] == pytest.approx(0.6) and ms["published/protocol"] == "ms"
    assert ms["val/mIoU"] != out["val/mIoU"], "the multi-scale + flip test is a different measurement"


@pytest.mark.slow
def test_frozen_encoder_run_trains_the_heads_only(tmp_path):
    run_dir = tmp_path / "r"
    run_entry("train.py", *TINY, "model.encoder.freeze=true", "trainer.max_steps=4", "trainer.val_check_interval=2",
              "callbacks.model_checkpoint.save_top_k=-1", f"hydra.run.dir={run_dir}", log_dir=tmp_path)
    first = torch.load(run_dir / "checkpoints" / "step_000002.ckpt", weights_only=True)
    last = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["global_step"] == 4 and last["hyper_parameters"]["record"]["model"]["encoder"]["freeze"] is True
    enc = [k for k in last["state_dict"] if k.startswith("model.encoder.")]
    assert enc and all(torch.equal(first["state_dict"][k], last["state_dict"][k]) for k in enc)
    cls = "model.decode_head.cls.weight"
    assert not torch.equal(first["state_dict"][cls], last["state_dict"][cls]), "the heads train"
