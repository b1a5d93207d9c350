"""The Lightning data module: one class for every dataset of the registry, pipelines from config."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_only
from torch.utils.data import DataLoader

from setr.data import build_dataset, build_pipeline
from setr.data.base import SegDataset
from setr.data.check import check_level
from setr.errors import SETRConfigError


class EpochSampler(torch.utils.data.Sampler[int]):
    """Shuffled (or ordered) indices that depend only on ``(seed, epoch)``, sharded over ranks, able to start
    part-way through an epoch. Makes resuming exact: the resumed run sees the batches the uninterrupted run
    would have seen (see :class:`ResumableLoader`)."""

    def __init__(self, n: int, shuffle: bool, seed: int = 0, world: int = 1, rank: int = 0,
                 drop_last: bool = False) -> None:
        self.n, self.shuffle, self.seed, self.world, self.rank = n, shuffle, seed, world, rank
        self.drop_last = drop_last
        self.epoch = 0
        self.start = 0  # samples of this rank's shard to skip once (mid-epoch resume)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _indices(self) -> list[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + 1_000_003 * self.epoch)
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = list(range(self.n))
        if self.world > 1 and self.drop_last:
            order = order[: self.n - self.n % self.world]
        return order[self.rank :: self.world]

    def __iter__(self):
        start, self.start = self.start, 0
        indices = self._indices()
        if not self.shuffle:
            return iter(indices[start:])
        # each training sample also carries the seed of its augmentation, fixed by (seed, epoch, index)
        base = (self.seed * 1_000_003 + self.epoch) * 10_000_019
        return iter([(i, (base + i) % 2**31) for i in indices[start:]])

    def __len__(self) -> int:
        return len(self._indices())


class ResumableLoader(DataLoader):
    """A DataLoader whose position in the epoch is saved in checkpoints (Lightning stores the state of loaders
    with ``state_dict``/``load_state_dict``), so a run resumed mid-epoch continues with the next batch.

    A restored position belongs to the epoch it was saved in: it applies to the next iteration only when the
    sampler is still at that epoch when iteration starts. A checkpoint taken on the last batch of an epoch holds a
    finished epoch; Lightning then moves on (``set_epoch(epoch + 1)``) before it draws the next batch, and that
    epoch must start at its first sample (applying the old position there skipped the whole epoch, so the resumed
    run trained on the data order and augmentations of the epoch after).

    The position lives in the :class:`EpochSampler`. Lightning may rebuild the loader with a sampler of its own
    (``trainer.overfit_batches`` puts in a ``SequentialSampler``, which has no epoch): such a loader saves an
    empty state and ignores a saved one, since there is no epoch order to return to."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._consumed = 0
        self._resume: tuple[int, int] | None = None

    def __iter__(self):
        resume, self._resume = self._resume, None
        self._consumed = 0
        if resume is not None and isinstance(self.sampler, EpochSampler) and resume[0] == self.sampler.epoch:
            self.sampler.start = resume[1] * self.batch_size
            self._consumed = resume[1]
        for batch in super().__iter__():
            self._consumed += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        if not isinstance(self.sampler, EpochSampler):
            return {}
        return {"epoch": self.sampler.epoch, "batches": self._consumed, "batch_size": self.batch_size}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if not isinstance(self.sampler, EpochSampler) or "epoch" not in state:
            return  # a replaced sampler, or a state saved by one: nothing to restore
        if state.get("batch_size") != self.batch_size:
            return  # a different batch size: positions do not carry over, start the epoch afresh
        self.sampler.set_epoch(state["epoch"])
        self._resume = (state["epoch"], state["batches"])


def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack when every image (and mask) has one size; otherwise keep lists (original-size validation labels)."""
    out: dict[str, Any] = {}
    for key in samples[0]:
        values = [s[key] for s in samples]
        if isinstance(values[0], torch.Tensor):
            same = len({tuple(v.shape) for v in values}) == 1
            out[key] = torch.stack(values) if same else values
        else:
            out[key] = torch.as_tensor(values) if isinstance(values[0], (int, float)) else values
    return out


class SegDataModule(L.LightningDataModule):
    """Builds train / val / test datasets of ``cfg.name`` with the configured pipelines.

    Args:
        cfg: the ``data`` config node (see ``conf/data/synthetic.yaml`` for every key).
        seed: seeds the augmentation pipeline and the train shuffling.
    """

    def __init__(self, cfg: Mapping, seed: int | None = None) -> None:
        super().__init__()
        self.cfg = dict(cfg)
        self.seed = seed
        for key in ("batch_size", "val_batch_size"):
            v = self.cfg.get(key, 1)
            if not isinstance(v, int) or v < 1:
                raise SETRConfigError(f"data.{key}: must be a positive integer, got {v!r}")
        self.check = check_level(self.cfg.get("check", "quick"))  # a bad value stops here, before any file is read
        self.datasets: dict[str, SegDataset] = {}

    def _dataset(self, split: str) -> SegDataset:
        if split in self.datasets:
            return self.datasets[split]
        cfg = self.cfg
        kwargs = dict(cfg.get("dataset") or {})
        if split != "train":
            kwargs.update(cfg.get("val_dataset") or {})
        if cfg.get("root") is not None:
            kwargs["root"] = str(cfg["root"])
        steps = cfg.get("train_pipeline") if split == "train" else cfg.get("val_pipeline")
        key = "data.train_pipeline" if split == "train" else "data.val_pipeline"
        transform = build_pipeline(steps, cfg["mean"], cfg["std"], key=key, seed=self.seed)
        # the pre-flight check runs on every rank (each drops the same bad samples); rank 0 alone shows a bar.
        # Datasets may be built before the trainer is attached: the rank comes from the launcher's environment.
        # `val_split`: the split the validation stage reads (debug=overfit scores the very batch it trains on)
        source = str(cfg.get("val_split") or "val") if split == "val" else split
        ds = build_dataset(cfg["name"], source, check=self.check, progress=None if rank_zero_only.rank == 0 else False,
                           transform=transform,
                           keep_original_mask=split != "train" and bool(cfg.get("val_keep_original_mask", False)),
                           skip_bad=bool(cfg.get("skip_bad", False)), **kwargs)
        if len(ds) == 0:
            raise SETRConfigError(f"data: the {split} split of {cfg['name']!r} is empty (root: {cfg.get('root')})")
        if ds.num_classes != cfg["num_classes"]:
            raise SETRConfigError(
                f"data.num_classes: {cfg['num_classes']} but dataset {cfg['name']!r} has {ds.num_classes} classes")
        self.datasets[split] = ds
        return ds

    @property
    def class_names(self) -> list[str]:
        return list(self.cfg.get("class_names") or self._dataset("val").class_names)

    @property
    def palette(self) -> list[list[int]]:
        return [list(c) for c in self._dataset("val").palette]

    def setup(self, stage: str | None = None) -> None:
        if stage in (None, "fit"):
            self._dataset("train")
        if stage in (None, "fit", "validate"):
            self._dataset("val")
        if stage in (None, "test"):
            self._dataset("test")

    def _world(self) -> tuple[int, int]:
        trainer = getattr(self, "trainer", None)
        if trainer is not None and trainer.world_size > 1:
            return trainer.world_size, trainer.global_rank
        return 1, 0

    def _loader(self, ds: SegDataset, batch_size: int, train: bool) -> DataLoader:
        """Loaders shard by rank themselves (``trainer.use_distributed_sampler`` is off): training shuffles by
        ``(seed, epoch)``; evaluation gives each rank every world_size-th sample with no padding, so a
        multi-process evaluation scores exactly the samples a single process scores.

        Each loader draws its workers' base seed from a generator of its own, not from torch's global RNG (a
        DataLoader takes one draw each time it starts iterating): the global RNG then serves the network alone
        (drop path, dropout), and a resumed run that restores it (:meth:`SETRModule.on_load_checkpoint`) draws what
        the straight run draws, although it starts its loaders at other moments."""
        workers = int(self.cfg.get("num_workers", 0))
        world, rank = self._world()
        drop_last = train and len(ds) >= batch_size * world
        sampler = EpochSampler(len(ds), shuffle=train, seed=self.seed or 0, world=world, rank=rank,
                               drop_last=train)
        return ResumableLoader(
            ds,
            batch_size=batch_size,
            sampler=sampler,
            drop_last=drop_last,
            num_workers=workers,
            pin_memory=bool(self.cfg.get("pin_memory", False)),
            persistent_workers=bool(self.cfg.get("persistent_workers", False)) and workers > 0,
            collate_fn=collate,
            generator=torch.Generator().manual_seed(self.seed or 0),
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self._dataset("train"), self.cfg["batch_size"], train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self._dataset("val"), self.cfg.get("val_batch_size", 1), train=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self._dataset("test"), self.cfg.get("val_batch_size", 1), train=False)

    def steps_per_epoch(self) -> int:
        world, _ = self._world()
        return max(1, math.floor(len(self._dataset("train")) / (self.cfg["batch_size"] * world)))
