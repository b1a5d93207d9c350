"""Lightning wiring: the module, the data module, callbacks. Models and datasets know nothing of this package."""

from setr.training.datamodule import SegDataModule
from setr.training.module import SETRModule

__all__ = ["SETRModule", "SegDataModule"]
