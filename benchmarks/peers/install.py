"""Install the peers of benchmarks/peers.py offline: the wheels of benchmarks/peers/wheels into
benchmarks/peers/site (a folder benchmarks/peers.py puts on ``sys.path``), for the Python that runs this script.
Nothing is downloaded and the interpreter's own packages are left as they are. The wheels and how they were
made: benchmarks/README.md. Idempotent (the folder is made anew).

    .venv/bin/python benchmarks/peers/install.py      # or: make peers
    python3 benchmarks/peers/install.py --site /tmp/site   # e.g. on a GPU machine with its own torch
"""

from __future__ import annotations

import argparse
import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
WHEELS = HERE / "wheels"
# always installed: the peer itself (mmcv-lite is mmcv 2.1.0 built without its compiled ops)
PEER = ("mmsegmentation", "mmengine", "mmcv_lite", "addict", "yapf", "termcolor", "ftfy")
# installed only where the interpreter lacks them (module name to look for): its own build is kept
OPTIONAL = {"regex": "regex", "prettytable": "prettytable", "wcwidth": "wcwidth", "platformdirs": "platformdirs"}
# needed and not shipped here (the project's own dependencies have them)
NEEDED = ("torch", "numpy", "scipy", "matplotlib", "yaml", "rich", "packaging", "PIL", "cv2")


def wheel_of(dist: str) -> Path:
    found = sorted(WHEELS.glob(f"{dist}-*.whl"))
    if not found:
        raise SystemExit(f"error: {WHEELS}: no wheel of {dist}; see benchmarks/README.md (peers) to make them")
    return found[-1]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--site", type=Path, default=HERE / "site")
    args = ap.parse_args(argv)
    missing = [m for m in NEEDED if importlib.util.find_spec(m) is None]
    if missing:
        print(f"error: {sys.executable} lacks {', '.join(missing)} (the project's dependencies: make install)",
              file=sys.stderr)
        return 2
    wheels = [wheel_of(d) for d in PEER]
    wheels += [wheel_of(d) for d, mod in OPTIONAL.items() if importlib.util.find_spec(mod) is None]
    if args.site.exists():
        shutil.rmtree(args.site)
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
           "--disable-pip-version-check", "--target", str(args.site), *map(str, wheels)]
    rc = subprocess.call(cmd)
    if rc:
        print(f"error: pip install into {args.site} failed (exit {rc})", file=sys.stderr)
        return 2
    print(f"peers installed into {args.site}: " + ", ".join(w.name.split("-")[0] + " " + w.name.split("-")[1]
                                                          for w in wheels))
    return 0


if __name__ == "__main__":
    sys.exit(main())
