"""The checkpoint record across versions: a schema version written into every record, records of older versions
(none written) still read, newer ones refused in one line, and moved class paths read through the alias table."""

from __future__ import annotations

import pytest
import torch

from conftest import write_tiny_checkpoint
from setr.checkpoint import RECORD_VERSION, ModelRecord, load_model, read_checkpoint
from setr.checkpoint import record as record_module
from setr.errors import SETRConfigError

RESCALE = {"_target_": "setr.data.transforms.RandomRescale", "img_scale": [96, 64], "ratio_range": None}


def _stored(path):
    return torch.load(path, weights_only=True)


def test_every_checkpoint_carries_the_record_version(tmp_path):
    path = write_tiny_checkpoint(tmp_path / "m.ckpt")
    assert _stored(path)["hyper_parameters"]["record"]["version"] == RECORD_VERSION == 1
    assert read_checkpoint(path).record.version == RECORD_VERSION


def test_a_record_written_before_versions_still_loads(tmp_path):
    path = write_tiny_checkpoint(tmp_path / "m.ckpt")
    ckpt = _stored(path)
    del ckpt["hyper_parameters"]["record"]["version"]  # what every checkpoint before the schema version holds
    torch.save(ckpt, tmp_path / "old.ckpt")
    model = load_model(tmp_path / "old.ckpt")
    assert model.record.version == RECORD_VERSION and model.record.num_classes == 4


@pytest.mark.parametrize("version, words", [(RECORD_VERSION + 1, "written by a newer setr (record version 2"),
                                            ("1", "version: expected a positive integer, got '1'"),
                                            (0, "version: expected a positive integer, got 0")])
def test_a_record_of_an_unknown_version_is_refused_in_one_line(tmp_path, version, words):
    path = write_tiny_checkpoint(tmp_path / "m.ckpt")
    ckpt = _stored(path)
    ckpt["hyper_parameters"]["record"]["version"] = version
    torch.save(ckpt, tmp_path / "v.ckpt")
    with pytest.raises(SETRConfigError) as e:
        load_model(tmp_path / "v.ckpt")
    assert words in str(e.value) and str(tmp_path / "v.ckpt") in str(e.value) and "\n" not in str(e.value)


def test_moved_class_paths_are_read_through_the_alias_table(tmp_path, monkeypatch):
    """A record naming a class at its old place loads and runs its resize from the new place."""
    from setr.inference import predict_images

    monkeypatch.setitem(record_module.TARGET_ALIASES, "setr.data.old_transforms.Rescale", RESCALE["_target_"])
    path = write_tiny_checkpoint(tmp_path / "m.ckpt", test_pipeline=[RESCALE])
    ckpt = _stored(path)  # a checkpoint written while the class was at its old place
    ckpt["hyper_parameters"]["record"]["test_pipeline"][0]["_target_"] = "setr.data.old_transforms.Rescale"
    torch.save(ckpt, path)
    model = load_model(path)
    assert model.record.test_pipeline == [RESCALE]
    image = (torch.rand(40, 60, 3) * 255).to(torch.uint8).numpy()
    pred = predict_images(model, [image])
    assert pred.labels.shape == (1, 40, 60) and tuple(pred.input.shape[-2:]) == (64, 96)  # resized by the step
    monkeypatch.delitem(record_module.TARGET_ALIASES, "setr.data.old_transforms.Rescale")
    with pytest.raises(Exception, match="old_transforms"):  # without the alias the old path is unknown
        predict_images(load_model(path), [image])


def test_the_record_is_the_same_after_a_round_trip():
    rec = ModelRecord(model={"num_classes": 3}, class_names=["a", "b", "c"], palette=[[0, 0, 0]] * 3,
                      test_pipeline=[RESCALE])
    assert ModelRecord.from_dict(rec.to_dict()) == rec
