"""Train SETR: ``python src/train.py [model=setr_mla] [data=pascal_context] [experiment=...] [-m sweeps]``.

The last stdout line is one JSON object with the final metrics (also written to ``<run dir>/metrics.json``).
Logic: :mod:`setr.tasks.train`; config: ``conf/train.yaml``.
The installed command ``setr-train`` is the same, from any working folder (:mod:`setr.cli`).
"""

from setr.cli import train

if __name__ == "__main__":
    train()
