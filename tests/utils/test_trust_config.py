"""A bad value is the first thing a user sees: one ``error: <key>: ...`` line, before the config is printed.

Most cases call :func:`setr.utils.config.check_config` in-process on a config composed as the entry point composes
it (Hydra's job config set, so ``+key`` overrides are seen as Hydra hands them over); a representative few run
the real entry points.
"""

from __future__ import annotations

import pytest
import yaml
from omegaconf import OmegaConf, open_dict

from pipeline import CONF, TINY, run_entry
from setr.errors import SETRConfigError

# TINY without extras.print_config=false: the tree must not be printed before the error even when it is on
BASE = [o for o in TINY if not o.startswith("extras.")]


def composed(*overrides: str, config: str = "train"):
    """The config an entry point's job gets for ``overrides`` (Hydra's job config set, ``hydra`` node removed)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config, overrides=list(overrides), return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg


def check(*overrides: str, config: str = "train") -> None:
    from setr.utils.config import check_config

    check_config(composed(*overrides, config=config))


@pytest.fixture(autouse=True)
def _no_job_config_left():
    """The Hydra job config set by :func:`composed` must not leak into other tests."""
    yield
    from hydra.core.hydra_config import HydraConfig

    HydraConfig.instance().cfg = None


@pytest.mark.parametrize("override, line", [
    ("trainer.max_steps=abc", "trainer.max_steps: expected an int > 0, or -1 (no step limit), got 'abc'"),
    ("trainer.max_steps=3.5", "trainer.max_steps: expected an int > 0, or -1 (no step limit), got 3.5"),
    ("seed=abc", "seed: expected an int or null, got 'abc'"),
    ("optimizer.momentum=abc", "optimizer.momentum: expected a number in [0, 1], got 'abc'"),
    ("optimizer.weight_decay=-1", "optimizer.weight_decay: expected a number >= 0, got -1"),
    ("data.num_workers=-1", "data.num_workers: expected an int >= 0"),
    ("trainer.val_check_interval=0", "trainer.val_check_interval: expected an int >= 1 (every N training steps) or"),
    ("trainer.val_check_interval=1.5", "trainer.val_check_interval: expected an int >= 1"),
    ("data.ignore_index=300", "data.ignore_index: expected 255"),
    ("data.ignore_index=2", "data.ignore_index: expected 255"),   # a class id of the 4 synthetic classes
    ("data.num_classes=4.5", "data.num_classes: expected an int >= 1 (the number of classes), got 4.5"),
    ("data.batch_size=0", "data.batch_size: expected an int >= 1"),
    ("data.crop_size=[64]", "data.crop_size: expected a size > 0 or [height, width], got [64]"),
    ("trainer.precision=17", "trainer.precision: expected one of"),
    ("trainer.devices=0", "trainer.devices: expected auto, an int >= 1"),
    ("+trainer.num_nodes=0", "trainer.num_nodes: expected an int >= 1, got 0"),
    ("trainer.gradient_clip_val=-1", "trainer.gradient_clip_val: expected a number >= 0 or null, got -1"),
    ("trainer.accumulate_grad_batches=0", "trainer.accumulate_grad_batches: expected an int >= 1, got 0"),
    ("trainer.log_every_n_steps=x", "trainer.log_every_n_steps: expected an int >= 1, got 'x'"),
    ("model.compile=yes", "model.compile: expected true or false, got 'yes'"),
    ("+optimizer.lrr=0.1", "optimizer.lrr: unknown key (added with +, but nothing reads it); did you mean "
                           "optimizer.lr?"),
    ("+data.batch_sz=4", "data.batch_sz: unknown key (added with +, but nothing reads it); did you mean "
                         "data.batch_size?"),
    ("+trainer.max_stepss=4", "trainer.max_stepss: unknown key (added with +, but nothing reads it); did you mean "
                              "trainer.max_steps?"),
    ("+optimizer.scheduler.powr=1", "optimizer.scheduler.powr: unknown key (added with +, but nothing reads it); "
                                    "did you mean optimizer.scheduler.power?"),
    ("+model.encoder.drop_path=0.1", "model.encoder.drop_path: unknown key (added with +, but nothing reads it); did "
                                     "you mean model.encoder.drop_path_rate?"),
    ("+seeed=1", "seeed: unknown key (added with +, but nothing reads it); did you mean seed?"),
])
def test_bad_value_is_one_line_naming_its_key(override, line):
    with pytest.raises(SETRConfigError) as e:
        check(*BASE, override)
    assert str(e.value).startswith(line), str(e.value)


def test_unset_num_classes_of_a_folder_dataset_says_how_to_set_it():
    with pytest.raises(SETRConfigError) as e:
        check("data=folder")
    msg = str(e.value)
    assert msg.startswith("data.num_classes: required; pass data.num_classes=N") and "classes.yaml" in msg, msg


@pytest.mark.parametrize("overrides", [
    (),
    ("seed=null", "trainer.val_check_interval=0.5", "trainer.precision=bf16-mixed", "trainer.devices=auto",
     "trainer.gradient_clip_val=1.0", "trainer.max_steps=-1", "trainer.max_epochs=2"),
    ("+trainer.profiler=simple", "+trainer.min_steps=1", "+data.val_split=train", "+ckpt_path=x.ckpt",
     "+optimizer.betas=[0.9,0.99]", "+callbacks.extra.x=1", "+data.dataset.anything=1"),
    ("+published={ss: 50.0}",),
    ("optimizer=adamw", "trainer.precision=16", "trainer.devices=[0]", "trainer.deterministic=warn"),
])
def test_good_values_and_keys_that_something_reads_pass(overrides):
    check(*BASE, *overrides)


def test_every_shipped_preset_passes():
    """The table and the known keys must accept every experiment and debug preset the project ships."""
    from setr.utils.schema import check_types

    for f in sorted((CONF / "experiment").glob("*.yaml")):
        check_types(composed(f"experiment={f.stem}"))
    for f in sorted((CONF / "debug").glob("*.yaml")):
        check("model/encoder=vit_test", f"debug={f.stem}")
    for group in ("trainer", "logger", "optimizer", "protocol", "hparams_search"):
        for f in sorted((CONF / group).glob("*.yaml")):
            check(*BASE, f"{group}={f.stem}")


def test_known_keys_cover_the_shipped_configs():
    """Every key of conf/data/*.yaml and conf/optimizer/*.yaml is a known key (a `+` of it is accepted)."""
    from setr.utils.schema import DATA_KEYS, OPTIMIZER_KEYS, SCHEDULER_KEYS

    for f in (CONF / "data").glob("*.yaml"):
        assert set(yaml.safe_load(f.read_text())) - {"defaults"} <= set(DATA_KEYS), f
    for f in (CONF / "optimizer").glob("*.yaml"):
        node = yaml.safe_load(f.read_text())
        assert set(node) - {"defaults"} <= set(OPTIMIZER_KEYS), f
        assert set(node.get("scheduler") or {}) <= set(SCHEDULER_KEYS), f


def test_group_additions_are_not_keys():
    """`+group=option` selects a config group (Hydra's choices), it adds no key: never refused."""
    from setr.utils.schema import check_added_keys

    cfg = composed("+trainer=cpu", "+optimizer=sgd", config="export")  # export.yaml has neither group
    assert "trainer" in cfg and "optimizer" in cfg
    check_added_keys(cfg)
    check_added_keys(OmegaConf.create({"optimizer": {"lr": 1}}), overrides=[])  # nothing added: nothing to check


@pytest.mark.parametrize("config, overrides, line", [
    ("predict", ("ckpt_path=x.ckpt", "input=x.png", "+batch_sz=4"), "batch_sz: unknown key"),
    ("export", ("ckpt_path=x.ckpt", "+formatt=onnx"), "formatt: unknown key"),
    ("summary", ("+model.comp=true",), "model.comp: unknown key"),
])
def test_other_tasks_refuse_keys_nothing_reads(config, overrides, line):
    from setr.utils.schema import check_added_keys

    cfg = composed(*overrides, config=config)
    with pytest.raises(SETRConfigError) as e:
        check_added_keys(cfg)
    assert str(e.value).startswith(line) and "did you mean" in str(e.value)


# ------------------------------------------------------------------------------------ the entry points
@pytest.mark.slow
@pytest.mark.parametrize("script, overrides, key", [
    ("train.py", ("trainer.max_steps=abc",), "trainer.max_steps"),
    ("train.py", ("+optimizer.lrr=0.1",), "optimizer.lrr"),
    ("train.py", ("data=folder",), "data.num_classes"),
    ("eval.py", ("ckpt_path=missing.ckpt", "data.ignore_index=300"), "data.ignore_index"),
    ("predict.py", ("ckpt_path=missing.ckpt", "input=missing.png", "+batch_sz=4", "extras.print_config=true"),
     "batch_sz"),
])
def test_entry_point_error_is_the_first_and_only_thing_printed(tmp_path, script, overrides, key):
    base = [] if script == "predict.py" or "data=folder" in overrides else BASE
    proc = run_entry(script, *base, *overrides, f"hydra.run.dir={tmp_path / 'run'}", log_dir=tmp_path, check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert [ln for ln in proc.stderr.splitlines() if ln.strip()] == [
        ln for ln in proc.stderr.splitlines() if ln.startswith(f"error: {key}: ")], proc.stderr[-2000:]
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not any(g in proc.stdout for g in ("├──", "└──", "┣━━", "┗━━")), "the config tree came first"
