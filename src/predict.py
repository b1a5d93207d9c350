"""Predict with a checkpoint: ``python src/predict.py ckpt_path=PATH input=IMAGE|FOLDER|'GLOB' [side_by_side=true]``.

Writes ``<stem>_label.png`` (class ids with the checkpoint's palette) and ``<stem>_overlay.png`` per image. The
last stdout line is one JSON object ``{"processed", "failed", "failures", "output_dir", "device"}``; exit code 1
when some images failed, 2 (one ``error: ...`` line) for a bad config or checkpoint. Logic:
:mod:`setr.tasks.predict`; config: ``conf/predict.yaml``.
The installed command ``setr-predict`` is the same, from any working folder (:mod:`setr.cli`).
"""

from setr.cli import predict

if __name__ == "__main__":
    predict()
