"""The entry points' output contract: metrics as ``metrics.json`` and as the final stdout line (one JSON object);
and :func:`atomic_write`, how every result file and checkpoint of a run reaches the disk.

A file is written whole or not at all: the bytes go to a temporary file in the destination folder, are flushed and
``fsync``-ed, and ``os.replace`` puts it in place (then the folder is ``fsync``-ed so the new name survives a power
cut). A kill at any moment leaves the previous file intact (a rename within one folder is atomic, whatever
``$TMPDIR`` is); a full disk ends with one line naming the file, the previous file intact and no partial file.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import re
import secrets
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import IO, Any

import torch

from setr.errors import SETRConfigError

# <name>.<pid>-<6 hex>.tmp: a partial file of atomic_write (the pid says which process was writing it)
_PARTIAL = re.compile(r"^.+\.\d+-[0-9a-f]{6}\.tmp$")
_NO_SPACE = {errno.ENOSPC, errno.EDQUOT}


def partial_name(path: str | Path) -> Path:
    """A fresh temporary name beside ``path``, in the same folder (so the final rename is atomic)."""
    path = Path(path)
    return path.with_name(f"{path.name}.{os.getpid()}-{secrets.token_hex(3)}.tmp")


def clean_partials(folder: str | Path) -> list[Path]:
    """Delete the partial files a killed writer left in ``folder`` (SIGKILL cannot be caught, and at full size
    each is as large as a checkpoint); returns them. A run folder has one writer at a time, so every partial file
    found there before a write is stale."""
    removed = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        if _PARTIAL.match(entry.name) and entry.is_file(follow_symlinks=False):
            try:
                os.unlink(entry.path)
                removed.append(Path(entry.path))
            except FileNotFoundError:
                pass
    return removed


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems cannot sync a directory; the rename itself is still atomic
        pass
    finally:
        os.close(fd)


def write_error(path: Path, e: OSError, existed: bool) -> SETRConfigError:
    """One line for a write that failed: the file, why, and that nothing of it was kept."""
    kept = f"the previous {path.name} is intact" if existed else f"no {path.name} was written"
    if e.errno in _NO_SPACE:
        why = "no space left on device" if e.errno == errno.ENOSPC else "disk quota exceeded (no space left)"
        return SETRConfigError(f"{path}: {why} while writing it; {kept} and no partial file is left; free some "
                               "space and run again (resume=auto continues a training run)")
    return SETRConfigError(f"{path}: cannot write it ({e.strerror or e}); {kept} and no partial file is left")


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], Any]) -> Path:
    """Write ``path`` whole or not at all: ``write(f)`` fills a temporary file in the same folder, which is then
    flushed, fsync-ed and renamed over ``path`` (and the folder fsync-ed). Stale partial files of killed writers
    in that folder are deleted first. Any failure deletes the temporary file; an ``OSError`` (disk full, no
    permission) becomes one :class:`SETRConfigError` line naming ``path``."""
    path = Path(path)
    folder = path.parent
    existed = path.exists()
    tmp = partial_name(path)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        clean_partials(folder)
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(e, OSError):
            raise write_error(path, e, existed) from e
        raise
    _fsync_dir(folder)
    return path


def write_text(path: str | Path, text: str) -> Path:
    """:func:`atomic_write` of a UTF-8 text."""
    data = text.encode("utf-8")
    return atomic_write(path, lambda f: f.write(data))


def collect_metrics(callback_metrics: Mapping[str, Any], prefixes=("train/", "val/", "test/")) -> dict[str, float]:
    """The scalar metrics Lightning logged under ``prefixes``, as floats, sorted by name."""
    out = {}
    for k, v in callback_metrics.items():
        if not k.startswith(prefixes):
            continue
        v = v.item() if isinstance(v, torch.Tensor) and v.numel() == 1 else v
        if isinstance(v, (int, float)):
            out[k] = float(v)
    return dict(sorted(out.items()))


def write_metrics(metrics: Mapping[str, Any], output_dir: str | Path, name: str = "metrics.json") -> Path:
    """``<output_dir>/metrics.json`` (written whole or not at all: :func:`atomic_write`)."""
    return write_text(Path(output_dir) / name, json.dumps(metrics, indent=2, default=_json_default) + "\n")


def print_last_line(metrics: Mapping[str, Any]) -> None:
    """The entry points' contract: the final stdout line is one JSON object."""
    sys.stdout.flush()
    sys.stderr.flush()
    print(json.dumps(metrics, default=_json_default), flush=True)


def _json_default(o: Any) -> Any:
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if isinstance(o, float) and math.isnan(o):
        return None
    return str(o)
