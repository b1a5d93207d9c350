"""Reading weight files without arbitrary unpickling: the one safe reader of every torch and safetensors file.

Checkpoints of this project (``ckpt_path=``, ``setr.load_model``), released SETR checkpoints (``setr-convert``),
resume's look into a run's checkpoints and pretrained ImageNet weights (``model.encoder.pretrained``) are all read
here, so each gets the same protection and the same one-line errors:

* ``torch.load(weights_only=True)``: tensors, plain Python values and, for released mmseg files whose ``meta`` holds
  them, numpy arrays / dtypes / scalars. A file whose pickle names anything else is refused with the globals it
  names (unpickling them could run code stored in the file); full unpickling happens only on explicit request
  (``setr-convert --trust-pickle``).
* A file that is no readable torch file at all (empty, truncated by an interrupted write or copy, random bytes, a web
  page, a Git LFS pointer) is named with why (:func:`checkpoint_damage`: judged from its size, first bytes and zip
  directory) as :class:`UnreadableCheckpoint`, so a caller with other checkpoints to fall back on can tell it apart.
* ``.safetensors``: tensors and the string metadata (:func:`read_safetensors_file`).

Ground floor: this module imports nothing of ``setr`` but its error type.
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path
from typing import Any

import torch

from setr.errors import SETRConfigError

# the start of a legacy (pre-zip) torch file: torch.serialization.MAGIC_NUMBER pickled as a long (after the
# protocol header, and a FRAME opcode from pickle protocol 4 on)
_LEGACY_MAGIC = b"\x8a\nl\xfc\x9cF\xf9 j\xa8P\x19"
CONVERT_HINT = "a released SETR checkpoint from a trusted source: setr-convert SRC DST --trust-pickle"


class UnreadableCheckpoint(SETRConfigError):
    """A file that is no readable torch file at all: empty, truncated (an interrupted write or copy), or something
    else (random bytes, a web page, a Git LFS pointer). :func:`read_torch_file` raises it, so a caller that has
    other checkpoints to fall back on (``resume=auto``) can tell it from a file that is read but refused."""


def numpy_safe_globals() -> list[Any]:
    """The numpy callables and types a pickled array, dtype or scalar needs (as in old mmseg ``meta``). They only
    build arrays / dtypes / scalars; an object array's items are unpickled by the same restricted unpickler."""
    import numpy as np

    try:
        from numpy._core import multiarray
    except ImportError:  # numpy < 2
        from numpy.core import multiarray  # type: ignore[no-redef]
    items: list[Any] = [np.ndarray, np.dtype]
    for mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
        items += [(multiarray._reconstruct, f"{mod}._reconstruct"), (multiarray.scalar, f"{mod}.scalar")]
    dtypes = getattr(np, "dtypes", None)
    if dtypes is not None:  # numpy >= 1.25: the class of each dtype instance (needed to BUILD it)
        items += [c for c in vars(dtypes).values() if isinstance(c, type) and issubclass(c, np.dtype)]
    return items


def _unsafe_globals(path: Path) -> list[str]:
    """The globals of a torch zip file that the weights-only unpickler would refuse (best effort)."""
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except Exception:
        return []
    allowed = {n if isinstance(n, str) else f"{n.__module__}.{n.__qualname__}"
               for n in (i[1] if isinstance(i, tuple) else i for i in numpy_safe_globals())}
    return [n for n in names if n not in allowed]


def checkpoint_damage(path: str | Path, error: BaseException | None = None) -> str | None:
    """Why ``path`` is no readable torch file, judged from the file itself (its size, first bytes and, for a zip
    archive, its directory: nothing is unpickled or read in full), or None when it looks like one. ``error``:
    what ``torch.load`` raised, for a legacy (pre-zip) file: anything but a refused global means it is damaged."""
    import zipfile

    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(64)
    except OSError as e:
        return f"it cannot be read ({e.strerror or e})"
    if size == 0:
        return "the file is empty (0 bytes: a write or copy that was cut short)"
    if head.startswith(b"PK"):
        try:
            with zipfile.ZipFile(path) as z:
                names = z.namelist()
        except (zipfile.BadZipFile, OSError, ValueError, EOFError):
            return (f"it is truncated or damaged ({size} bytes, a torch zip archive without its directory at the end: "
                    "what an interrupted write or copy leaves)")
        if not any(n == "data.pkl" or n.endswith("/data.pkl") for n in names):
            return "it is a zip archive but not a torch file (no data.pkl in it)"
        return None
    if _LEGACY_MAGIC in head[:32]:  # a real pickle refused for its globals raises UnpicklingError; else damage
        if error is not None and (not isinstance(error, pickle.UnpicklingError) or "truncated" in str(error)):
            return (f"it is truncated or damaged ({size} bytes, a legacy torch file that cannot be read to its end: "
                    f"an interrupted write or copy; {type(error).__name__})")
        return None
    if head.startswith(b"version https://git-lfs"):
        return "it is a Git LFS pointer, not the file itself (fetch it with git lfs pull)"
    if head.lstrip()[:1] == b"<":
        return "it is not a torch file but a text / HTML page (a failed download?)"
    if head[:1] == b"\x80":
        return "it is a Python pickle but not a torch file (torch.save writes a zip archive or a legacy torch file)"
    return f"it is not a torch file (no torch zip archive, no legacy torch file: it starts {head[:8].hex(' ')})"


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [""])[0]


def read_torch_file(path: str | Path, what: str = "ckpt_path", map_location: str | torch.device = "cpu", *,
                    trust_pickle: bool = False, mmap: bool = False, kind: str = "checkpoint",
                    pickle_hint: str = CONVERT_HINT) -> Any:
    """``torch.load`` without arbitrary unpickling (``weights_only=True``, numpy arrays allowed), every failure one
    :class:`SETRConfigError` line naming ``what`` (the key or argument that named the file) and the file:

    * missing: "not found";
    * no readable torch file (empty, truncated, random bytes, ...: :func:`checkpoint_damage`):
      :class:`UnreadableCheckpoint`, "is not a readable <kind>: <why>";
    * a real torch file whose pickle needs more than tensors, plain values and numpy arrays: the globals it names
      and ``pickle_hint`` (what to do about it); ``trust_pickle=True`` (only ``setr-convert --trust-pickle``)
      loads it with full unpickling on explicit request.

    ``mmap=True``: tensors memory-mapped (nothing read in full; a zip file only, else it is read whole)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise SETRConfigError(f"{what}: {kind} {path} not found")
    try:
        with torch.serialization.safe_globals(numpy_safe_globals()):
            if mmap:
                try:
                    return torch.load(path, map_location=map_location, weights_only=True, mmap=True)
                except Exception:  # not a zip file (mmap needs one): read it whole below, or say why
                    pass
            return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        damage = checkpoint_damage(path, e)
        if damage is not None:
            raise UnreadableCheckpoint(f"{what}: {path} is not a readable {kind}: {damage}") from e
        if not isinstance(e, pickle.UnpicklingError):
            raise SETRConfigError(f"{what}: cannot read {kind} {path} ({type(e).__name__}: {_first_line(e)})") from e
        if trust_pickle:
            try:
                return torch.load(path, map_location=map_location, weights_only=False)
            except Exception as e2:
                raise SETRConfigError(f"{what}: cannot read {path} even with --trust-pickle ({type(e2).__name__}: "
                                      f"{_first_line(e2)})") from e2
        names = _unsafe_globals(path)
        if not names:
            m = re.search(r"GLOBAL ([\w.]+)|got (<class '[\w.]+'>)|function (\S+)", str(e))
            names = [next(g for g in m.groups() if g)] if m else []
        found = f" ({', '.join(names[:4])}{', ...' if len(names) > 4 else ''})" if names else ""
        raise SETRConfigError(
            f"{what}: {path} needs arbitrary unpickling: it holds Python objects beyond tensors, plain values and "
            f"numpy arrays{found}, which are not unpickled (that could run code stored in the file); "
            f"{pickle_hint}") from e


def read_safetensors_file(path: str | Path, what: str = "ckpt_path", kind: str = "checkpoint"
                          ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, string metadata) of a ``.safetensors`` file; one line naming ``what`` and the file otherwise."""
    from safetensors import safe_open

    path = Path(path).expanduser()
    if not path.is_file():
        raise SETRConfigError(f"{what}: {kind} {path} not found")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118  (safe_open is no dict)
    except Exception as e:
        raise SETRConfigError(f"{what}: cannot read safetensors file {path} ({type(e).__name__}: "
                              f"{_first_line(e)})") from e
    return state, dict(meta)
