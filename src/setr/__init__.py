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


def slide_stride(crop: Any) -> Any:
    """2/3 of a sliding-window crop (an int, or ``[height, width]`` side by side), rounded down: the ratio of the
    paper's settings (512 -> 341, 768 -> 512, 480 -> 320). The data configs' ``inference.stride`` is
    ``${setr.slide_stride:${data.crop_size}}``, so a smaller ``data.crop_size`` never leaves a stride longer
    than the window (uncovered pixels)."""
    if isinstance(crop, (int, str)):
        return max(1, int(crop) * 2 // 3)
    return [max(1, int(c) * 2 // 3) for c in crop]


def _register_resolvers() -> None:
    """At import of any ``setr`` module, so every composed config (entry points, tests, notebooks) resolves."""
    from omegaconf import OmegaConf

    if not OmegaConf.has_resolver("setr.slide_stride"):
        OmegaConf.register_new_resolver("setr.slide_stride", slide_stride)


_register_resolvers()


def __getattr__(name: str) -> Any:  # lazy: `import setr` stays light for the entry points' error paths
    if name in __all__:
        from setr import checkpoint

        return getattr(checkpoint, name)
    raise AttributeError(f"module 'setr' has no attribute {name!r}")
