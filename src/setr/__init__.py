"""SETR: SEgmentation TRansformer with PyTorch Lightning + Hydra.

``setr.load_model(path)`` returns a trained network in eval mode with its :class:`setr.ModelRecord` attached
(``model.record``: classes, palette, normalisation, inference settings), without Lightning.
"""

from typing import Any

__version__ = "0.1.0"
__all__ = ["ModelRecord", "load_model"]


def __getattr__(name: str) -> Any:  # lazy: `import setr` stays light for the entry points' error paths
    if name in __all__:
        from setr import checkpoint

        return getattr(checkpoint, name)
    raise AttributeError(f"module 'setr' has no attribute {name!r}")
