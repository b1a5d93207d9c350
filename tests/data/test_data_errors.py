"""Data errors reach the user as one line naming the file, also from DataLoader worker processes; the loader's
resumable state survives Lightning replacing its sampler (``trainer.overfit_batches``)."""

from __future__ import annotations

import pickle

import pytest
import torch
from torch.utils.data import DataLoader, SequentialSampler

import fake_datasets as fake
from setr.data.folder import FolderDataset
from setr.data.synthetic import SyntheticShapes
from setr.errors import DataError, SETRConfigError
from setr.training.datamodule import EpochSampler, ResumableLoader, collate


def _raise_in_worker_style(exc: BaseException) -> BaseException:
    """What torch does with an exception raised in a DataLoader worker: wrap its traceback, rebuild it."""
    from torch.utils.data._utils import ExceptionWrapper

    try:
        raise exc from OSError("image file is truncated (3 bytes not processed)")
    except BaseException:  # the wrapper records whatever was raised
        wrapper = ExceptionWrapper(where="in DataLoader worker process 0")
    try:
        wrapper.reraise()
    except BaseException as rebuilt:
        return rebuilt
    raise AssertionError("reraise() did not raise")


# ------------------------------------------------------------------------------------------ one line
@pytest.mark.parametrize("cls", [DataError, SETRConfigError])
def test_rebuilt_worker_exception_keeps_only_the_original_message(cls):
    msg = "/data/x/images/train/a.png: unreadable or truncated image (image file is truncated)"
    rebuilt = _raise_in_worker_style(cls(msg))
    assert type(rebuilt) is cls
    assert str(rebuilt) == msg
    assert pickle.loads(pickle.dumps(rebuilt)).args == (msg,)  # worker exceptions travel pickled
    assert str(cls("plain: message")) == "plain: message"  # ordinary messages are left alone


def test_worker_error_is_one_line_naming_the_file(tmp_path):
    root = fake.make_folder(tmp_path / "f", n_train=3, n_val=1, size=(64, 64))
    bad = fake.truncate(root / "images" / "train" / "train_001.png")
    ds = FolderDataset("train", root=root)
    loader = DataLoader(ds, batch_size=1, num_workers=1, collate_fn=collate)
    with pytest.raises(DataError) as e:
        list(loader)
    msg = str(e.value)
    assert "\n" not in msg, msg
    assert msg.startswith(f"{bad}: ") and "truncated" in msg


@pytest.mark.slow
def test_train_entry_point_worker_error_is_one_line(tmp_path):
    """src/train.py with data loading in a worker process and a truncated training image: exit code 2 and one
    ``error:`` line naming the file, no traceback."""
    from pipeline import run_entry

    data_dir = tmp_path / "data"
    root = fake.make_folder(data_dir / "folder", n_train=4, n_val=2, size=(64, 64))
    bad = fake.truncate(root / "images" / "train" / "train_002.png")
    args = ["data=folder", f"paths.data_dir={data_dir}", "data.num_classes=3", "model/encoder=vit_test",
            "data.crop_size=64", "data.train_pipeline.0.img_scale=[64,64]", "data.val_pipeline.0.img_scale=[64,64]",
            "data.inference.stride=32", "data.batch_size=2", "data.num_workers=1", "data.persistent_workers=false",
            "data.pin_memory=false", "trainer.max_steps=4", "trainer.val_check_interval=4",
            "trainer.num_sanity_val_steps=0", "extras.print_config=false",
            f"hydra.run.dir={tmp_path / 'run'}"]
    proc = run_entry("train.py", *args, log_dir=tmp_path / "logs", check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1, proc.stderr[-3000:]
    assert str(bad) in errors[0] and "truncated" in errors[0]
    after = proc.stderr.split(errors[0], 1)[1]  # no continuation of a worker's traceback after the line
    assert not after.lstrip("\n").startswith(("Original", "  File")), after[:500]


# ------------------------------------------------------------------------------------------ loader state
def _loader(ds, sampler) -> ResumableLoader:
    return ResumableLoader(ds, batch_size=2, sampler=sampler, collate_fn=collate)


def test_loader_state_survives_a_replaced_sampler():
    """``trainer.overfit_batches`` makes Lightning rebuild the train loader with a SequentialSampler, which has
    no epoch: saving (every checkpoint) and restoring the loader's state must still work."""
    from lightning.pytorch.trainer.states import RunningStage
    from lightning.pytorch.utilities.data import _update_dataloader

    ds = SyntheticShapes(num_samples=8, image_size=16)
    loader = _loader(ds, EpochSampler(len(ds), shuffle=True, seed=3))
    replaced = _update_dataloader(loader, SequentialSampler(ds), mode=RunningStage.TRAINING)
    assert isinstance(replaced, ResumableLoader) and isinstance(replaced.sampler, SequentialSampler)
    first = next(iter(replaced))
    state = replaced.state_dict()
    fresh = _update_dataloader(loader, SequentialSampler(ds), mode=RunningStage.TRAINING)
    fresh.load_state_dict(state)
    assert torch.equal(next(iter(fresh))["index"], first["index"])  # no position to restore: from the start
    # a state saved by the normal loader loads into a replaced one (and the other way round) without error
    replaced.load_state_dict(loader.state_dict())
    _loader(ds, EpochSampler(len(ds), shuffle=True)).load_state_dict(state)


def test_loader_state_resumes_mid_epoch():
    ds = SyntheticShapes(num_samples=10, image_size=16)
    straight = _loader(ds, EpochSampler(len(ds), shuffle=True, seed=5))
    straight.sampler.set_epoch(2)
    it = iter(straight)
    seen = [next(it)["index"] for _ in range(2)]
    state = straight.state_dict()
    rest = [b["index"] for b in it]
    assert state == {"epoch": 2, "batches": 2, "batch_size": 2}
    resumed = _loader(ds, EpochSampler(len(ds), shuffle=True, seed=5))
    resumed.load_state_dict(state)
    again = [b["index"] for b in resumed]
    assert len(again) == len(rest) == 3 and all(torch.equal(a, b) for a, b in zip(again, rest))
    assert resumed.state_dict()["batches"] == 5 and len(seen) == 2
