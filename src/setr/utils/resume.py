"""``resume=auto``: continue the newest run of the same experiment in its own folder, and ``ckpt_path``.

A run is identified by its task name and the ``experiment``, ``model`` and ``data`` choices Hydra recorded in
``<run dir>/.hydra/`` (``config.yaml`` and ``hydra.yaml``). ``resume=auto`` composes the config of the command
line once, before Hydra runs it, finds the newest run with a ``checkpoints/last.ckpt`` and the same identity, and
points ``hydra.run.dir`` at it, so the run continues there: same CSV, same W&B run, global step carried on.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from setr.errors import SETRConfigError

log = logging.getLogger("setr")

IDENTITY = ("task_name", "experiment", "model", "data")
CONF_DIR = Path(__file__).resolve().parents[3] / "conf"


def run_identity(task_name: Any, choices: Mapping[str, Any]) -> dict[str, str | None]:
    """``{"task_name", "experiment", "model", "data"}`` of a run (``None`` where a group was not chosen)."""
    ident = {"task_name": None if task_name is None else str(task_name)}
    for group in IDENTITY[1:]:
        value = choices.get(group)
        ident[group] = None if value in (None, "null") else str(value)
    return ident


def identity_of_run(run_dir: Path) -> dict[str, str | None] | None:
    """The identity Hydra recorded in ``run_dir/.hydra``; None when the folder has no readable record."""
    try:
        config = OmegaConf.load(run_dir / ".hydra" / "config.yaml")
        hydra = OmegaConf.load(run_dir / ".hydra" / "hydra.yaml")
        choices = OmegaConf.to_container(hydra.hydra.runtime.choices, resolve=False)
        return run_identity(config.get("task_name"), choices)
    except Exception:
        return None


def candidate_runs(log_dir: Path, task_name: str) -> list[Path]:
    """Run folders with a ``checkpoints/last.ckpt`` under ``<log_dir>/<task_name>/{runs,multiruns}``, newest
    checkpoint first."""
    base = log_dir / task_name
    lasts = list(base.glob("runs/*/checkpoints/last.ckpt")) + list(base.glob("multiruns/*/*/checkpoints/last.ckpt"))
    return [p.parent.parent for p in sorted(lasts, key=lambda p: p.stat().st_mtime, reverse=True)]


def find_run(log_dir: str | Path, identity: Mapping[str, Any]) -> Path | None:
    """The newest run under ``log_dir`` with a ``last.ckpt`` and this ``identity``."""
    for run_dir in candidate_runs(Path(log_dir), str(identity["task_name"])):
        if identity_of_run(run_dir) == dict(identity):
            return run_dir
    return None


def _compose(overrides: Iterable[str], config_name: str) -> DictConfig:
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            return compose(config_name, overrides=list(overrides), return_hydra_config=True)
    finally:
        GlobalHydra.instance().clear()  # @hydra.main initialises its own


def apply_auto_resume(argv: list[str], config_name: str = "train") -> list[str]:
    """Rewrite the command line for ``resume=auto`` / ``resume=<run dir>`` (run before Hydra parses it): add
    ``hydra.run.dir`` of the run to continue, or leave it unchanged, with one line saying why. Multiruns resume
    per job in their own folders (``resume`` is then handled by :func:`resolve_ckpt_path`)."""
    overrides = [a for a in argv[1:] if not a.startswith("-")]
    args = {a.split("=", 1)[0]: a.split("=", 1)[1] for a in overrides if "=" in a}
    value = args.get("resume")
    if value in (None, "null", "None", "false") or "hydra.run.dir" in args or "-m" in argv or "--multirun" in argv:
        return argv
    if value != "auto":
        run_dir = Path(value)
        if not (run_dir / "checkpoints" / "last.ckpt").is_file():
            raise SETRConfigError(f"resume={value}: {run_dir / 'checkpoints' / 'last.ckpt'} not found")
    else:
        cfg = _compose(overrides, config_name)
        identity = run_identity(cfg.get("task_name"), cfg.hydra.runtime.choices)
        log_dir = Path(str(cfg.paths.log_dir))
        what = " ".join(f"{k}={v}" for k, v in identity.items() if k != "task_name" and v is not None)
        run_dir = find_run(log_dir, identity)
        if run_dir is None:
            print(f"resume=auto: no {identity['task_name']} run of {what} with a last.ckpt under {log_dir}; "
                  "starting a new run", file=sys.stderr, flush=True)
            return argv
        print(f"resume=auto: continuing {run_dir} ({what})", file=sys.stderr, flush=True)
    return [*argv, f"hydra.run.dir={run_dir.resolve()}"]


def resolve_ckpt_path(cfg: DictConfig) -> str | None:
    """The checkpoint ``trainer.fit`` continues from: ``ckpt_path``, else with ``resume`` set the run folder's
    own ``checkpoints/last.ckpt`` (a re-queued SLURM job, or the folder ``resume=auto`` chose)."""
    if cfg.get("ckpt_path"):
        p = Path(str(cfg.ckpt_path))
        if not p.is_file():
            raise SETRConfigError(f"ckpt_path: checkpoint {p} not found")
        return str(p)
    if cfg.get("resume"):
        last = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
        if last.is_file():
            log.info("resuming from %s", last)
            return str(last)
    return None


def newest_checkpoint(log_dir: str | Path, task_name: str = "train") -> Path | None:
    """The newest ``checkpoints/last.ckpt`` of any run under ``<log_dir>/<task_name>`` (the notebooks' default)."""
    runs = candidate_runs(Path(log_dir), task_name)
    return runs[0] / "checkpoints" / "last.ckpt" if runs else None
