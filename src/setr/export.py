"""``python -m setr.export ckpt_path=...``: an alias of ``python src/export.py`` and ``setr-export`` that older
commands and scripts use. The same config (``conf/export.yaml``), task (:mod:`setr.tasks.export`) and one-line
errors (:func:`setr.cli.export`)."""

from setr.cli import export

if __name__ == "__main__":
    export()
