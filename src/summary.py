"""Model summary: ``python src/summary.py model=setr_mla data=ade20k|experiment=<preset> [summary.flops=false]``.

Prints a table of parameter counts and GFLOPs per part of the configured SETR at the data config's crop size
(built on the meta device: nothing is allocated, loaded or downloaded). The last stdout line is one JSON object
``{"total", "encoder", "decode_head", "auxiliary_heads", "gflops"}``. Logic: :mod:`setr.tasks.summary`; config:
``conf/summary.yaml``.
The installed command ``setr-summary`` is the same, from any working folder (:mod:`setr.cli`).
"""

from setr.cli import summary

if __name__ == "__main__":
    summary()
