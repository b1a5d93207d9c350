"""SETR: SEgmentation TRansformer with PyTorch Lightning + Hydra.

``setr.load_model(path)`` returns a trained network in eval mode with its :class:`setr.ModelRecord` attached
(``model.record``: classes, palette, normalisation, inference settings), without Lightning.
"""

from typing import Any

__version__ = "0.1.0"
__all__ = ["ModelRecord", "load_model"]

# The lowest torch the code supports, as pyproject.toml declares it (a test holds the two equal): safe checkpoint
# loading needs ``torch.serialization.safe_globals`` / ``get_unsafe_globals_in_checkpoint`` (2.5) and the
# ``weights_only`` loading that became torch.load's default in 2.6, which Lightning's own loading follows.
MIN_TORCH = (2, 6)


def check_torch_version(version: str | None = None) -> None:
    """Raise one line when the installed torch (or ``version``) is older than :data:`MIN_TORCH`."""
    import re

    from setr.errors import SETRConfigError

    if version is None:
        import torch

        version = torch.__version__
    found = tuple(int(x) for x in re.findall(r"\d+", str(version))[:2])
    if found < MIN_TORCH:
        need = ".".join(map(str, MIN_TORCH))
        raise SETRConfigError(f"torch {version} is installed; this project needs torch>={need} "
                              f"(pip install 'torch>={need}', or `make install`)")


def __getattr__(name: str) -> Any:  # lazy: `import setr` stays light for the entry points' error paths
    if name in __all__:
        from setr import checkpoint

        return getattr(checkpoint, name)
    raise AttributeError(f"module 'setr' has no attribute {name!r}")
