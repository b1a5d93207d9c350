"""Name -> dataset class (a :class:`setr.registry.Registry`), filled by one mechanism: the
:func:`register_dataset` decorator on each class.

A new dataset decorates its class with ``@register_dataset("<name>")``, gets a ``conf/data/<name>.yaml``, and is
added to the built-in imports of ``setr/data/__init__.py`` (which Python runs before any module of the package,
so the registry is complete whichever module is imported first); the names are then offered by ``data.name``
(and listed when an unknown one is given).
"""

from __future__ import annotations

from typing import Any

from setr.data.base import SegDataset
from setr.data.check import check_dataset
from setr.errors import SETRConfigError
from setr.registry import Registry

# ``data.name`` -> dataset class; an unknown name lists the choices alphabetically
DATASETS: Registry[type[SegDataset]] = Registry("dataset", sort_choices=True)

# Class decorator: offer the class as ``data.name=<name>``. A name taken by another class raises (two datasets
# silently shadowing each other would train on the wrong data); the same class again is harmless.
register_dataset = DATASETS.register


def build_dataset(name: str, split: str, check: str | bool | None = "quick", progress: bool | None = None,
                  **kwargs: Any) -> SegDataset:
    """Instantiate dataset ``name`` for ``split`` and run the pre-flight check at level ``check`` (see
    :mod:`setr.data.check`; ``progress`` for its bar). Unknown names and arguments raise :class:`SETRConfigError`,
    bad files :class:`setr.errors.DataError`."""
    cls = DATASETS.lookup(name, "data.name")
    try:
        ds = cls(split=split, **kwargs)
    except TypeError as e:
        raise SETRConfigError(f"data.dataset: {e}") from e
    check_dataset(ds, check, progress=progress)
    return ds
