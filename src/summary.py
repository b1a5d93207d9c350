"""Model summary: ``python src/summary.py model=setr_mla data=ade20k [summary.flops=false]``.

Prints a table of parameter counts (all / trainable) and GFLOPs per part (encoder, MLA neck, decode head,
auxiliary heads) of the configured SETR at the data config's crop size. The model is built on the meta device,
so nothing is allocated, initialised, loaded or downloaded. The last stdout line is one JSON object:
``{"total", "encoder", "decode_head", "auxiliary_heads"}`` (parameters; the MLA neck counts in ``encoder``) and
``gflops`` (one eval forward, batch 1; null with summary.flops=false). A bad config prints one ``error: ...``
line on stderr and exits with code 2.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("PROJECT_ROOT", str(Path(__file__).resolve().parents[1]))

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from setr.utils.run import main_guard, print_last_line, run_hydra_main  # noqa: E402


@hydra.main(version_base="1.3", config_path="../conf", config_name="summary")
@main_guard
def main(cfg: DictConfig) -> None:
    from setr.summary import summarize

    print_last_line(summarize(cfg))


if __name__ == "__main__":
    sys.exit(run_hydra_main(main))
