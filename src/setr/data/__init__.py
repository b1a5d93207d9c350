"""Datasets (plain ``torch.utils.data.Dataset``) and augmentation pipelines; nothing of Lightning here."""

# the built-in datasets register themselves (@register_dataset) when imported: every name is known once the package is
from setr.data import ade20k, cityscapes, folder, pascal_context, synthetic  # noqa: F401
from setr.data.base import DataError, SegDataset, read_image, read_mask
from setr.data.check import CHECK_LEVELS, check_dataset
from setr.data.registry import DATASETS, build_dataset, register_dataset
from setr.data.synthetic import SyntheticShapes
from setr.data.transforms import CatMaxRatioCrop, RandomRescale, build_pipeline
from setr.values import IGNORE_INDEX

__all__ = ["CHECK_LEVELS", "DATASETS", "IGNORE_INDEX", "CatMaxRatioCrop", "DataError", "RandomRescale", "SegDataset",
           "SyntheticShapes", "build_dataset", "build_pipeline", "check_dataset", "read_image", "read_mask",
           "register_dataset"]
