"""Datasets (plain ``torch.utils.data.Dataset``) and augmentation pipelines; nothing of Lightning here."""

from setr.data.base import IGNORE_INDEX, DataError, SegDataset, read_image, read_mask
from setr.data.registry import DATASETS, build_dataset, register_dataset
from setr.data.synthetic import SyntheticShapes
from setr.data.transforms import CatMaxRatioCrop, RandomRescale, build_pipeline

__all__ = ["DATASETS", "IGNORE_INDEX", "CatMaxRatioCrop", "DataError", "RandomRescale", "SegDataset",
           "SyntheticShapes", "build_dataset", "build_pipeline", "read_image", "read_mask", "register_dataset"]
