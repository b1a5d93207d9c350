"""Run a benchmark command and keep its result with where it came from: ``benchmarks/results/<name>.json``.

    python benchmarks/record.py cpu_small -- python src/bench.py
    python benchmarks/record.py cpu_vitb_mla_256 --note "3 rounds" -- python src/bench.py model=setr_mla ...

The command's output passes through unchanged (stdout and stderr, as it runs); its last stdout line that is one
JSON object (the contract of ``src/bench.py`` and of every script in this folder) becomes ``result``, and
``provenance`` says where it was measured: the device (GPU name, or the CPU model from ``/proc/cpuinfo``), the
NVIDIA driver (CUDA only), the Python, torch, timm and Lightning versions of the interpreter that ran it, the git
commit (and whether the working tree had uncommitted changes), the UTC start date, the exact command, its wall
time, the CPU count and ``os.getloadavg()`` at start and end (a shared machine's other work shows there). The file
is written whole (temporary file, then rename) and only when the command succeeded and printed its JSON line;
otherwise nothing is written and the exit status is the command's (or 1, with one line saying what is missing).

Every speed figure in README.md and docs/speed.md names one of these files; ``tests/test_speed_results.py``
checks that each named file exists and holds :data:`PROVENANCE_KEYS`. Not a part of the package: standard
library only, so it runs with any interpreter.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
# what every result file's "provenance" holds (tests/test_speed_results.py checks them)
PROVENANCE_KEYS = ("device_name", "driver", "python", "torch", "timm", "lightning", "git_commit", "git_dirty",
                   "date_utc", "command", "wall_s", "cpu_count", "loadavg_start", "loadavg_end")

# run by the command's own interpreter: the versions that measured, and the GPU it saw
_PROBE = """
import json, platform
out = {"python": platform.python_version()}
for mod in ("torch", "timm", "lightning"):
    try:
        out[mod] = __import__(mod).__version__
    except Exception:
        out[mod] = None
try:
    import torch
    out["gpu"] = torch.cuda.get_device_name() if torch.cuda.is_available() else None
except Exception:
    out["gpu"] = None
print(json.dumps(out))
"""


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), or what :mod:`platform` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def nvidia_driver() -> str | None:
    """The NVIDIA driver version (``nvidia-smi``), or None without one."""
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return out.strip().splitlines()[0].strip() if out.strip() else None


def git_state(where: Path | None = None) -> tuple[str | None, bool | None, list[str]]:
    """(HEAD's commit, whether tracked files other than ``benchmarks/results/`` differ from it, which ones) of the
    checkout the command ran in (the working directory: a second worktree at another commit records that commit),
    or (None, None, []) outside a git checkout."""
    where = Path.cwd() if where is None else where
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True,
                                timeout=30, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=where,
                               capture_output=True, text=True, timeout=30, check=True).stdout.splitlines()
    except (OSError, subprocess.SubprocessError):
        return None, None, []
    # result files written by earlier steps of a run are not the code measured
    changed = [line[3:] for line in dirty if not line[3:].startswith("benchmarks/results/")]
    return commit, bool(changed), changed


def interpreter_of(command: list[str], given: str | None) -> str:
    """The Python that runs ``command``: ``--python``, else the command's first word if it is a Python, else this
    one."""
    if given:
        return given
    if Path(command[0]).name.startswith("python"):
        return command[0]
    return sys.executable


def probe(python: str) -> dict:
    """Versions and GPU name as ``python`` sees them (None each where it cannot say)."""
    try:
        out = subprocess.run([python, "-c", _PROBE], capture_output=True, text=True, timeout=120, check=True)
        return json.loads(out.stdout.strip().splitlines()[-1])
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return {"python": None, "torch": None, "timm": None, "lightning": None, "gpu": None}


def last_json(lines: list[str]) -> dict | None:
    """The last line that parses as one JSON object."""
    for line in reversed(lines):
        line = line.strip()
        if line.startswith("{"):
            try:
                value = json.loads(line)
            except ValueError:
                continue
            if isinstance(value, dict):
                return value
    return None


def run_teed(command: list[str]) -> tuple[int, list[str]]:
    """Run ``command``; its stdout is echoed as it comes and kept; stderr passes straight through."""
    lines: list[str] = []
    with subprocess.Popen(command, stdout=subprocess.PIPE, text=True, bufsize=1) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            sys.stdout.write(line)
            sys.stdout.flush()
            lines.append(line)
    return proc.returncode, lines


def write_whole(path: Path, data: dict) -> None:
    """``data`` as indented JSON at ``path``, written to a temporary file beside it and renamed into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2, sort_keys=False)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def record(name: str, command: list[str], results: Path = RESULTS, python: str | None = None,
           note: str | None = None) -> int:
    """Run ``command`` and write ``results/<name>.json``; returns the exit status to leave with."""
    started = datetime.datetime.now(datetime.UTC)
    load_start = list(os.getloadavg())
    t0 = time.monotonic()
    try:
        rc, lines = run_teed(command)
    except OSError as e:
        print(f"record.py: cannot run {command[0]!r}: {e.strerror or e}", file=sys.stderr)
        return 127
    wall = time.monotonic() - t0
    load_end = list(os.getloadavg())
    if rc != 0:
        print(f"record.py: the command exited with status {rc}; {results / (name + '.json')} not written",
              file=sys.stderr)
        return rc
    result = last_json(lines)
    if result is None:
        print(f"record.py: the command printed no JSON object line; {results / (name + '.json')} not written",
              file=sys.stderr)
        return 1
    versions = probe(interpreter_of(command, python))
    gpu = result.get("gpu") or (versions.get("gpu") if result.get("device") == "cuda" else None)
    commit, dirty, changed = git_state()
    provenance = {
        "device_name": gpu or cpu_model(),
        "driver": nvidia_driver() if gpu else None,
        "python": versions.get("python"),
        "torch": versions.get("torch"),
        "timm": versions.get("timm"),
        "lightning": versions.get("lightning"),
        "git_commit": commit,
        "git_dirty": dirty,
        "git_dirty_files": changed[:20],  # what differed (e.g. only docs), when git_dirty
        "date_utc": started.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "command": shlex.join(command),
        "wall_s": round(wall, 1),
        "cpu_count": os.cpu_count(),
        "loadavg_start": [round(x, 2) for x in load_start],
        "loadavg_end": [round(x, 2) for x in load_end],
        "os": f"{platform.system()} {platform.release()}",
    }
    data = {"name": name, "note": note, "provenance": provenance, "result": result}
    write_whole(results / f"{name}.json", data)
    print(f"record.py: wrote {results / (name + '.json')}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--" not in argv:
        print("record.py: usage: record.py NAME [--results DIR] [--python PY] [--note TEXT] -- COMMAND...",
              file=sys.stderr)
        return 2
    cut = argv.index("--")
    parser = argparse.ArgumentParser(prog="record.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("name", help="the result file's name: benchmarks/results/<name>.json")
    parser.add_argument("--results", type=Path, default=RESULTS, help="the folder (default benchmarks/results)")
    parser.add_argument("--python", default=None, help="the interpreter whose versions are recorded "
                        "(default: the command's first word if it is a Python, else this one)")
    parser.add_argument("--note", default=None, help="a remark kept in the file (e.g. a shortened run)")
    args = parser.parse_args(argv[:cut])
    command = argv[cut + 1:]
    if not command:
        print("record.py: no command after '--'", file=sys.stderr)
        return 2
    if not NAME.match(args.name):
        print(f"record.py: name {args.name!r}: use letters, digits, '_', '-', '.' (it becomes "
              f"<results>/<name>.json)", file=sys.stderr)
        return 2
    return record(args.name, command, args.results, args.python, args.note)


if __name__ == "__main__":
    sys.exit(main())
