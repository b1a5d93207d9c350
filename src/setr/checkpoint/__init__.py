"""Loading, in one home: the model record, reading checkpoint files, converting released SETR checkpoints.

* :mod:`~setr.checkpoint.record`: :class:`ModelRecord`, what a checkpoint carries besides its weights (schema
  version, alias table for moved class paths);
* :mod:`~setr.checkpoint.load`: :func:`read_checkpoint` (any checkpoint file -> :class:`Checkpoint`) and
  :func:`load_model` (-> the network), used by ``setr-eval``, ``setr-predict``, ``setr-export`` and the notebooks;
* :mod:`~setr.checkpoint.released`: the official / mmsegmentation weights -> this project's names (pure functions);
* :mod:`~setr.checkpoint.convert`: released files -> this project's checkpoints (``setr-convert``).

The bytes of every file are read by the one safe reader, :mod:`setr.files`.
"""

from setr.checkpoint.load import Checkpoint, load_model, network_state, read_checkpoint, strip_compile_prefix
from setr.checkpoint.record import RECORD_VERSION, TARGET_ALIASES, ModelRecord, record_of
from setr.files import UnreadableCheckpoint

__all__ = ["RECORD_VERSION", "TARGET_ALIASES", "Checkpoint", "ModelRecord", "UnreadableCheckpoint", "load_model",
           "network_state", "read_checkpoint", "record_of", "strip_compile_prefix"]
