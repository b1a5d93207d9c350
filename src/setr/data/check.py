"""The pre-flight dataset check (``data.check``), run on every split when it is built.

A truncated image or a label file with stray values otherwise surfaces when its batch comes up, hours into a
run; this check finds it in seconds, before training starts. Levels:

* ``quick`` (the default): every sample's image and label file exists and its header is readable (``PIL`` opens
  the header without decoding pixels), image and label have one size, the label has one channel (L, P, I,
  I;16, ...). About a millisecond per sample.
* ``full``: also decodes every image and label and maps the label values through the dataset's own mapping
  (:meth:`SegDataset.load`, exactly what training reads), so truncated pixel data and values outside the classes
  and the ignore value are found too. About the cost of one epoch of data loading, without augmentations.
* ``off``: nothing.

The first problem stops with one :class:`setr.errors.DataError` line naming the file. With ``data.skip_bad``
each rejected sample is left out and listed in ``dataset.skipped`` instead: the one mechanism by which bad
samples are dropped. Datasets whose samples are not files (the synthetic one) have nothing to check.

After the check, a dataset with a ``check_hint()`` method may add one advisory line (a warning, not an error) from
what the check read: ``data=folder`` names a smaller ``data.crop_size`` when the crop is larger than every training
image (:meth:`setr.data.folder.FolderDataset.check_hint`). Only the process of rank 0 says it.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from lightning.pytorch.utilities import rank_zero_only
from rich.console import Console
from rich.progress import track

from setr.data.base import SegDataset
from setr.errors import DataError, SETRConfigError

log = logging.getLogger("setr")

CHECK_LEVELS = ("quick", "full", "off")


def check_level(value: object, key: str = "data.check") -> str:
    """The check level of a config value. YAML reads an unquoted ``off`` as False, so False means ``off``;
    None (key absent) the default ``quick``. Anything else raises one line naming ``key``."""
    if value is False:
        return "off"
    if value is None:
        return "quick"
    if isinstance(value, str) and value in CHECK_LEVELS:
        return value
    raise SETRConfigError(f"{key}: {value!r} is not a check level; use one of {', '.join(CHECK_LEVELS)}")


@dataclass(frozen=True)
class CheckResult:
    """What :func:`check_dataset` did: ``checked`` samples at ``level`` in ``seconds``; ``skipped`` samples of
    the dataset are left out in all (rejected here, or unmatched when the files were listed)."""

    level: str
    checked: int
    skipped: int
    seconds: float


def check_dataset(ds: SegDataset, level: str = "quick", progress: bool | None = None) -> CheckResult:
    """Run :meth:`SegDataset.check_sample` on every sample of ``ds`` at ``level`` (see the module docstring).

    With ``ds.skip_bad`` the rejected samples are removed from ``ds.samples`` and their one-line reasons appended
    to ``ds.skipped``; otherwise the first one raises. ``progress``: a transient rich progress bar on stderr;
    None shows it only when stderr is a terminal (logs and captured test output stay clean), False never (e.g.
    ranks other than 0). Logs one line with the count and the time."""
    level = check_level(level)
    n = len(ds)
    if level == "off" or n == 0 or ds.sample_files(0) is None:
        return CheckResult(level, 0, len(ds.skipped), 0.0)
    console = Console(stderr=True)
    show = console.is_terminal if progress is None else progress
    split = getattr(ds, "split", "")
    start = time.perf_counter()
    kept = []
    for i in track(range(n), description=f"checking {split} data ({level})", total=n, console=console,
                   transient=True, disable=not show):
        try:
            ds.check_sample(i, level)
        except DataError as e:
            if not ds.skip_bad:
                raise
            ds.skipped.append(str(e))
        else:
            kept.append(ds.samples[i])
    ds.samples = kept
    seconds = time.perf_counter() - start
    log.info("data check %s: %d %s samples (%s) in %.2f s; %d skipped", level, n, split, type(ds).__name__,
             seconds, len(ds.skipped))
    hint = getattr(ds, "check_hint", None)
    line = hint() if callable(hint) else None
    if line and rank_zero_only.rank == 0:
        log.warning(line)
    return CheckResult(level, n, len(ds.skipped), seconds)
