"""Shared fixtures: compose the project's Hydra config, and build tiny SETR models from the real head configs."""

from __future__ import annotations

import copy
import os
from collections.abc import Callable
from functools import cache
from pathlib import Path

import pytest

from setr.paths import CONF_DIR


def _share_the_cores_between_workers() -> None:
    """Under ``pytest -n N`` each worker (and every run it launches: the variable is inherited) gets its share of
    torch's threads. Left alone, two workers on two cores each run two OpenMP threads: four spinning threads on two
    cores made a 15 s run take 290 s when both workers trained at once. A value the user set is kept."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers < 2 or "OMP_NUM_THREADS" in os.environ:
        return
    import torch

    threads = max(1, torch.get_num_threads() // workers)
    os.environ["OMP_NUM_THREADS"] = str(threads)
    torch.set_num_threads(threads)


_share_the_cores_between_workers()


def _compose(overrides: tuple[str, ...], config_name: str):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name, overrides=list(overrides))


@cache
def _model_cfg(overrides: tuple[str, ...]) -> dict:
    from omegaconf import OmegaConf

    # conf/summary.yaml composes only data, model, paths and extras: the quickest way to a model node
    cfg = _compose(overrides, "summary")
    return OmegaConf.to_container(cfg.model, resolve=True)


def model_cfg(*overrides: str) -> dict:
    """The resolved ``model`` node for ``overrides`` (a fresh copy each call; composition is cached)."""
    return copy.deepcopy(_model_cfg(tuple(overrides)))


def tiny_model_cfg(head: str = "naive", crop: int = 64, num_classes: int = 5, *overrides: str) -> dict:
    """A real head config (``conf/model/head/<head>.yaml``) on the 4-block, 64-wide test encoder."""
    return model_cfg(f"model/head={head}", "model/encoder=vit_test", f"data.crop_size={crop}",
                     f"data.num_classes={num_classes}", *overrides)


@pytest.fixture
def tiny_setr() -> Callable[..., object]:
    """``tiny_setr(head="pup", crop=64, num_classes=5)`` -> a seeded SETR on the test encoder (CPU, eval mode)."""
    import torch

    from setr.models import build_setr

    def build(head: str = "naive", crop: int = 64, num_classes: int = 5, *overrides: str, seed: int = 0):
        torch.manual_seed(seed)
        return build_setr(tiny_model_cfg(head, crop, num_classes, *overrides)).eval()

    return build


def write_tiny_checkpoint(path: Path, head: str = "naive", crop: int = 64, num_classes: int = 4, seed: int = 0,
                          inference: dict | None = None, test_pipeline: list | None = None,
                          record=None) -> Path:
    """A checkpoint in src/train.py's format (``hyper_parameters.record`` + ``state_dict``) of a tiny seeded SETR
    with the synthetic dataset's class names and palette: what predict / export / eval read, without a training
    run. ``record``: another model's record (the other arguments but ``seed`` are then unused)."""
    import lightning
    import torch

    from setr.checkpoint import ModelRecord
    from setr.data.synthetic import SyntheticShapes
    from setr.training import SETRModule

    data = SyntheticShapes(num_samples=1, num_classes=num_classes)
    torch.manual_seed(seed)
    record = record or ModelRecord(model=tiny_model_cfg(head, crop, num_classes), class_names=list(data.class_names),
                         palette=[list(c) for c in data.palette], crop_size=crop,
                         inference=inference or {"mode": "whole"}, test_pipeline=test_pipeline or [])
    module = SETRModule(record=record, optimizer={"name": "sgd", "lr": 0.01})
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"hyper_parameters": dict(module.hparams), "state_dict": module.state_dict(),
                "pytorch-lightning_version": lightning.__version__, "epoch": 0, "global_step": 0}, path)
    return path


@pytest.fixture
def tiny_ckpt(tmp_path) -> Path:
    """Path of a tiny 4-class checkpoint (see :func:`write_tiny_checkpoint`)."""
    return write_tiny_checkpoint(tmp_path / "tiny.ckpt")


def count_calls(monkeypatch, owner, name: str) -> list[int]:
    """Count calls of ``owner.<name>`` (still called through): ``[n]``, updated live."""
    calls = [0]
    real = getattr(owner, name)

    def spy(*args, **kwargs):
        calls[0] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, spy)
    return calls


def count_sdpa_calls(monkeypatch) -> list[int]:
    """Count calls of ``F.scaled_dot_product_attention`` (the fused attention kernel)."""
    import torch

    return count_calls(monkeypatch, torch.nn.functional, "scaled_dot_product_attention")
