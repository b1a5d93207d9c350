"""Export a checkpoint: ``python src/export.py ckpt_path=PATH [format=onnx|torchscript] [output=PATH]``.

Writes ``<stem>.onnx`` / ``<stem>.pt`` next to the checkpoint (or ``output``) with the checkpoint's mean, std,
classes and palette as metadata. The last stdout line is one JSON object (``format``, ``output``,
``max_abs_diff``, ...); exit code 2 (one ``error: ...`` line) for a bad value or checkpoint, 1 when the exported
file differs from PyTorch. ``python -m setr.export`` is the same command. Logic: :mod:`setr.tasks.export`;
config: ``conf/export.yaml``.
The installed command ``setr-export`` is the same, from any working folder (:mod:`setr.cli`).
"""

from setr.cli import export

if __name__ == "__main__":
    export()
