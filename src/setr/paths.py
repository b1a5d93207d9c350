"""Where the project is: the one home of the project root and of the Hydra config folder ``conf/``.

The package lives in ``<project>/src/setr``: the project root is two folders above it, and ``conf/`` is there. The
entry points (``python src/<task>.py``, the ``setr-*`` console scripts, ``python -m setr.export``) and every
module that composes a config read the location from here, so a command behaves the same from any working folder.

``$PROJECT_ROOT`` (``conf/paths``: ``paths.root_dir``) is where ``data/``, ``weights/`` and ``logs/`` live; the
entry points default it to :data:`PROJECT_ROOT` (:func:`use_project_root`). It does not move ``conf/``: the
configs belong to the code they configure.

Only a source checkout has ``conf/``: an install that copied the package elsewhere (``pip install .`` without
``-e``) has none, and :func:`conf_dir` says so in one line instead of a Hydra traceback.
"""

from __future__ import annotations

import os
from pathlib import Path

from setr.errors import SETRConfigError

PROJECT_ROOT = Path(__file__).resolve().parents[2]  # <project>/src/setr/paths.py -> <project>
CONF_DIR = PROJECT_ROOT / "conf"


def conf_dir() -> Path:
    """:data:`CONF_DIR`, checked: one line naming it when it is not there (a non-editable install)."""
    if not CONF_DIR.is_dir():
        raise SETRConfigError(
            f"{CONF_DIR}: the Hydra config folder conf/ is not there; setr reads conf/ from its source checkout: "
            "install the checkout editable (pip install -e <project>) or run python src/<task>.py from it")
    return CONF_DIR


def use_project_root() -> None:
    """Default ``$PROJECT_ROOT`` (``paths.root_dir``: ``data/``, ``weights/``, ``logs/``) to the project, so a run
    writes under the project's ``logs/`` whatever the working folder; a value already set is kept."""
    os.environ.setdefault("PROJECT_ROOT", str(PROJECT_ROOT))
