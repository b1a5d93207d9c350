"""Name -> dataset class. New datasets register here and get a ``conf/data/<name>.yaml``."""

from __future__ import annotations

from typing import Any

from setr.data.base import SegDataset
from setr.data.synthetic import SyntheticShapes
from setr.errors import SETRConfigError

DATASETS: dict[str, type[SegDataset]] = {
    "synthetic": SyntheticShapes,
}


def register_dataset(name: str, cls: type[SegDataset]) -> None:
    DATASETS[name] = cls


def build_dataset(name: str, split: str, **kwargs: Any) -> SegDataset:
    """Instantiate dataset ``name`` for ``split``; unknown names and arguments raise :class:`SETRConfigError`."""
    _load_builtin()
    if name not in DATASETS:
        raise SETRConfigError(f"data.name: unknown dataset {name!r}; choose one of {', '.join(sorted(DATASETS))}")
    try:
        ds = DATASETS[name](split=split, **kwargs)
    except TypeError as e:
        raise SETRConfigError(f"data.dataset: {e}") from e
    ds.validate()
    return ds


def _load_builtin() -> None:
    """Import the real-dataset modules (they register themselves); absent modules are simply not offered."""
    import importlib

    for mod in ("ade20k", "cityscapes", "pascal_context", "folder"):
        try:
            importlib.import_module(f"setr.data.{mod}")
        except ModuleNotFoundError as e:
            if e.name != f"setr.data.{mod}":
                raise
