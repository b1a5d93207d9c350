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


def scale_for_crop(crop: Any) -> list[int]:
    """The rescale ``[long, short]`` that goes with a training crop (an int, or ``[height, width]``): each side
    times 520/480, rounded (half up), the Pascal Context recipe's ratio (crop 480 in images rescaled to 520; 256 ->
    277, 64 -> 69). ``conf/data/folder.yaml`` derives its train ``img_scale`` and its ``test_scale`` from
    ``data.crop_size`` with ``${setr.scale_for_crop:${data.crop_size}}``, so setting the crop alone fits the recipe
    to small images; a value set on the command line (``data.test_scale=[600,600]``) replaces the derived one."""
    sides = (crop, crop) if isinstance(crop, (int, str)) else tuple(crop)
    return [(int(c) * 520 + 240) // 480 for c in sides]


def out_indices(name: str, family: str, depth: Any = None) -> list[int]:
    """``${setr.out_indices:<encoder>,<up|mla>[,<depth>]}``: the blocks a head family reads on an encoder (the
    encoder table, :func:`setr.models.encoders.out_indices_of`; ``depth``: a ``model.encoder.arch.depth``
    override)."""
    from setr.models.encoders import out_indices_of

    return out_indices_of(str(name), str(family), None if depth in (None, "", "null") else int(depth))


def encoder_norm(name: str, which: str) -> list[float]:
    """``${setr.encoder_norm:<encoder>,mean|std}``: the normalisation of the encoder's pretraining (0..255 scale),
    from the encoder table: the data configs' ``mean`` / ``std`` follow the encoder's weights."""
    from setr.models.encoders import spec_of

    spec = spec_of(str(name))
    return [float(v) for v in (spec.mean if which == "mean" else spec.std)]


def layer_decay(name: str) -> float | None:
    """``${setr.layer_decay:<encoder>}``: the layer-wise lr decay of the encoder's fine-tuning recipes (the encoder
    table; None: none)."""
    from setr.models.encoders import spec_of

    return spec_of(str(name)).layer_decay


def weights_path(folder: str, name: str) -> str:
    """``${setr.weights_path:${paths.weights_dir},<encoder>}``: ``<folder>/<file>`` of the encoder's default released
    weights (the encoder table); ``none`` when it has none (random initialisation)."""
    from setr.models.encoders import default_weights

    w = default_weights(str(name))
    return f"{folder}/{w.name}" if w is not None else "none"


def missing_dependency(error: ModuleNotFoundError) -> None:
    """A package setr needs is not in this Python (``python src/train.py`` with a Python that is not the project's
    ``.venv``): one line and exit code 2 when an entry-point script is running, else the error again with the
    same advice."""
    import sys
    from pathlib import Path

    advice = (f"No module named {error.name!r} in {sys.executable}: setr's dependencies are not installed in this "
              "Python; run `make install` once, then use .venv/bin/python, the .venv/bin/setr-* commands or "
              "`source .venv/bin/activate`")
    main = getattr(sys.modules.get("__main__"), "__file__", None) or ""
    if Path(main).resolve().parent == Path(__file__).resolve().parents[1]:  # src/<task>.py
        print(f"error: {advice}", file=sys.stderr)
        raise SystemExit(2)
    raise ModuleNotFoundError(advice, name=error.name) from error


def _register_resolvers() -> None:
    """At import of any ``setr`` module, so every composed config (entry points, tests, notebooks) resolves."""
    try:
        from omegaconf import OmegaConf
    except ModuleNotFoundError as e:
        missing_dependency(e)

    # a list result as a ListConfig: OmegaConf.resolve (--cfg job --resolve) stores no plain list in a config
    as_node = lambda v: OmegaConf.create(v) if isinstance(v, list) else v
    for name, fn in (("setr.slide_stride", slide_stride), ("setr.scale_for_crop", scale_for_crop),
                     ("setr.out_indices", out_indices), ("setr.encoder_norm", encoder_norm),
                     ("setr.weights_path", weights_path), ("setr.layer_decay", layer_decay)):
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, lambda *args, fn=fn: as_node(fn(*args)))


_register_resolvers()


def __getattr__(name: str) -> Any:  # lazy: `import setr` stays light for the entry points' error paths
    if name in __all__:
        from setr import checkpoint

        return getattr(checkpoint, name)
    raise AttributeError(f"module 'setr' has no attribute {name!r}")
