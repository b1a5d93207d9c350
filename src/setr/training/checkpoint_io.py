"""Checkpoint files written whole or not at all, whatever ``$TMPDIR`` is.

Lightning's ``TorchCheckpointIO`` writes through an fsspec transaction: the bytes go to a temporary file made by
``tempfile`` (in ``$TMPDIR``), then ``shutil.move`` puts it in place. When ``$TMPDIR`` is on another filesystem
than the run folder (node-local ``/tmp``, logs on shared storage: the usual cluster layout) that move is a copy that
first truncates the destination: a kill during it leaves a partial or empty ``last.ckpt`` (and a GB-sized orphan in
``$TMPDIR``), and the run cannot resume.

:class:`AtomicCheckpointIO` writes every checkpoint as a temporary file in the checkpoint's own folder, flushed and
``fsync``-ed, then renamed over the destination (:func:`setr.utils.output.atomic_write`): at every moment the file
under the checkpoint's name is the complete previous one or the complete new one. The partial file a SIGKILL
leaves (which no handler can remove) is deleted before the next write into that folder, and when training starts
(:class:`setr.training.callbacks.Checkpoint`). A full disk stops the run with one line naming the file, the
previous checkpoint intact. :func:`setr.tasks.train.build` gives every trainer this plugin
(:func:`use_atomic_checkpoints`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.cloud_io import _is_local_file_protocol
from lightning.pytorch.plugins.io import TorchCheckpointIO

from setr.utils.output import atomic_write


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose saves are atomic in the destination folder (remote URLs: Lightning's own)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None:  # as TorchCheckpointIO: it takes none
            raise TypeError("`Trainer.save_checkpoint(..., storage_options=...)` with `storage_options` arg"
                            f" is not supported for `{type(self).__name__}`.")
        if not _is_local_file_protocol(path):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        atomic_write(Path(path), lambda f: torch.save(checkpoint, f))


def use_atomic_checkpoints(trainer: Any) -> None:
    """Give ``trainer`` an :class:`AtomicCheckpointIO` where it would write through Lightning's default
    ``TorchCheckpointIO``; a ``CheckpointIO`` given in ``trainer.plugins`` (or a strategy's own, e.g. FSDP's) is kept.
    Done on the built trainer, so it holds with every ``trainer`` config, ``plugins`` list (SLURM's) or none."""
    strategy = trainer.strategy
    if type(strategy.checkpoint_io) is TorchCheckpointIO:
        strategy.checkpoint_io = AtomicCheckpointIO()
