"""Helpers shared by src/train.py and src/eval.py (everything here may know of Hydra and Lightning)."""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import warnings
from collections.abc import Callable, Mapping
from functools import wraps
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from setr.errors import SETRConfigError

log = logging.getLogger("setr")


# ------------------------------------------------------------------------------------------ errors
def main_guard(fn: Callable[[DictConfig], Any]) -> Callable[[DictConfig], Any]:
    """Wrap a task so a :class:`SETRConfigError` ends the process with ONE line on stderr and exit code 2, and
    an active W&B run is always finished (so each job of a ``-m`` sweep gets its own run)."""

    @wraps(fn)
    def wrapper(cfg: DictConfig) -> Any:
        try:
            return fn(cfg)
        except SETRConfigError as e:
            print(f"error: {e}", file=sys.stderr, flush=True)
            raise SystemExit(2) from None
        finally:
            finish_wandb()

    return wrapper


def finish_wandb() -> None:
    if "wandb" in sys.modules:
        import wandb

        if wandb.run is not None:
            wandb.finish()


def check_config(cfg: DictConfig) -> None:
    """Catch the common config mistakes before anything heavy happens; each raises one clear line."""
    for key in ("data", "model"):
        if key not in cfg or cfg[key] is None:
            raise SETRConfigError(f"{key}: missing config group; pick one with {key}=<name>")
    if "optimizer" in cfg:
        lr = cfg.optimizer.get("lr")
        if not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr <= 0:
            raise SETRConfigError(f"optimizer.lr: must be a positive number, got {lr!r}")
    try:
        OmegaConf.to_container(cfg.data, resolve=True)
        OmegaConf.to_container(cfg.model, resolve=True)
    except Exception as e:  # noqa: BLE001 - interpolation errors name the key
        raise SETRConfigError(f"config: {str(e).splitlines()[0]}") from e


def extras(cfg: DictConfig) -> None:
    ex = cfg.get("extras") or {}
    # Lightning prints through its own console handler; Hydra's root handlers already show (and file) it
    for name in ("lightning.pytorch", "lightning.fabric"):
        lg = logging.getLogger(name)
        for h in list(lg.handlers):
            if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler):
                lg.removeHandler(h)
    if ex.get("ignore_warnings"):
        for pattern in (
            ".*does not have many workers.*",
            ".*The number of training batches.*",
            ".*find_unused_parameters.*",
            ".*torch.cuda.amp.*",
            ".*`isinstance\\(treespec, LeafSpec\\)`.*",
            ".*Experiment logs directory .* exists and is not empty.*",
            ".*Checkpoint directory .* exists and is not empty.*",
            ".*sync_dist=True.*when logging on epoch level in distributed.*",  # val scores: torchmetrics syncs them
        ):
            warnings.filterwarnings("ignore", message=pattern)
    if ex.get("print_config") and is_rank_zero():
        print_config(cfg)


def is_rank_zero() -> bool:
    # SLURM_PROCID: under SLURM (trainer=slurm, hydra/launcher=slurm) SLURM starts every rank itself and Lightning
    # sets no LOCAL_RANK / RANK in the environment
    return int(os.environ.get("LOCAL_RANK", os.environ.get("RANK", "0"))) == 0 and \
        int(os.environ.get("NODE_RANK", "0")) == 0 and int(os.environ.get("SLURM_PROCID", "0")) == 0


def print_config(cfg: DictConfig) -> None:
    from rich import print as rprint
    from rich.tree import Tree

    tree = Tree("config", guide_style="dim")
    order = ["data", "model", "optimizer", "trainer", "callbacks", "logger", "paths"]
    for key in order + [k for k in cfg if k not in order]:
        if key not in cfg:
            continue
        value = cfg[key]
        text = OmegaConf.to_yaml(value, resolve=False) if isinstance(value, DictConfig) else str(value)
        tree.add(f"[bold]{key}[/bold]").add(text.rstrip())
    rprint(tree)


# ------------------------------------------------------------------------------------- instantiate
def instantiate_group(cfg: Mapping | None, group: str) -> list[Any]:
    """Instantiate each ``_target_`` node of a group (callbacks, logger), naming the entry on failure."""
    from hydra.utils import instantiate

    objs = []
    for name, node in (cfg or {}).items():
        if isinstance(node, Mapping) and "_target_" in node:
            try:
                objs.append(instantiate(node))
            except Exception as e:  # noqa: BLE001
                cause = e.__cause__ or e
                raise SETRConfigError(f"{group}.{name}: {str(cause).splitlines()[0]}") from e
    return objs


def cpu_only(trainer_cfg: Mapping) -> bool:
    acc = str(trainer_cfg.get("accelerator", "auto"))
    return acc == "cpu" or (acc == "auto" and not torch.cuda.is_available())


# -------------------------------------------------------------------------------------------- resume
def find_last_checkpoint(log_dir: str | Path, task_name: str = "train") -> Path | None:
    """The newest ``checkpoints/last.ckpt`` under ``<log_dir>/<task_name>/runs`` and ``.../multiruns``."""
    base = Path(log_dir) / task_name
    found = [p for p in base.glob("runs/*/checkpoints/last.ckpt")] + list(base.glob("multiruns/*/*/checkpoints/last.ckpt"))
    return max(found, key=lambda p: p.stat().st_mtime) if found else None


def apply_auto_resume(argv: list[str]) -> list[str]:
    """``resume=auto`` on the command line: point ``hydra.run.dir`` at the newest run with a ``last.ckpt`` so the
    run continues in its own folder (same CSV / W&B run). Run before Hydra parses the command line.
    ``resume=<run dir>`` picks that run explicitly."""
    args = {a.split("=", 1)[0]: a.split("=", 1)[1] for a in argv[1:] if "=" in a and not a.startswith("-")}
    value = args.get("resume")
    if value in (None, "null", "None") or "hydra.run.dir" in args or "-m" in argv or "--multirun" in argv:
        return argv
    if value == "auto":
        root = Path(os.environ.get("PROJECT_ROOT", "."))
        log_dir = Path(args.get("paths.log_dir", root / "logs"))
        last = find_last_checkpoint(log_dir, args.get("task_name", "train"))
        if last is None:
            print(f"resume=auto: no last.ckpt under {log_dir}; starting a new run", file=sys.stderr)
            return argv
        run_dir = last.parent.parent
    else:
        run_dir = Path(value)
        if not (run_dir / "checkpoints" / "last.ckpt").is_file():
            print(f"error: resume={value}: {run_dir / 'checkpoints' / 'last.ckpt'} not found", file=sys.stderr)
            raise SystemExit(2)
    return argv + [f"hydra.run.dir={run_dir.resolve()}"]


def resolve_ckpt_path(cfg: DictConfig) -> str | None:
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


# ----------------------------------------------------------------------------------- DDP under Hydra
def patch_lightning_hydra_ddp() -> None:
    """Make Lightning's DDP child processes join this Hydra job instead of starting their own.

    Lightning re-runs the script for ranks > 0 with the original command line plus ``hydra.run.dir``. Under a
    ``-m`` sweep that command line is the whole sweep (every child would launch a sweep of its own and the run
    hangs) and ``hydra.run.dir`` is a fresh timestamped folder. Here children get this job's own overrides, its
    output folder, no ``.hydra`` subfolder and no log file of their own.
    """
    from lightning.pytorch.strategies.launchers import subprocess_script as pl_launcher

    def hydra_ddp_cmd(local_rank: int) -> tuple[list[str], str]:
        from hydra.core.hydra_config import HydraConfig
        from hydra.utils import get_original_cwd, to_absolute_path

        hc = HydraConfig.get()
        command = [sys.executable, to_absolute_path(sys.argv[0]), *hc.overrides.task]
        command += [
            f'hydra.run.dir="{hc.runtime.output_dir}"',
            f"hydra.job.name={hc.job.name}_rank{local_rank}",
            "hydra.mode=RUN",  # hparams_search=optuna sets hydra.mode=MULTIRUN: a child must not start a study
            "hydra.output_subdir=null",
            "hydra/job_logging=disabled",
            "~hydra.job_logging.handlers",  # conf/hydra/default.yaml's file handler would be left half-defined
            "hydra/hydra_logging=disabled",
            "extras.print_config=false",
        ]
        return command, get_original_cwd()

    pl_launcher._hydra_subprocess_cmd = hydra_ddp_cmd


# ------------------------------------------------------------------------------------- Optuna sweeps
def optuna_storage(url: str | None = None) -> Any:
    """``hydra.sweeper.storage`` of ``hparams_search=optuna``: in memory when ``url`` is empty, else an RDB
    storage (``sqlite:///study.db``) that keeps the study for a later ``-m`` to continue or for several workers.

    optuna 2.x (the Hydra sweeper requires optuna < 3) stamps its alembic schema version on a bare
    ``engine.connect()`` and never commits: SQLAlchemy 2 dropped autocommit, so the stamp is rolled back while
    its open transaction keeps SQLite's write lock. ``RDBStorage(url)`` then fails with ``AssertionError`` in
    ``get_current_version`` (``database is locked`` with ``skip_compatibility_check``). The two version-manager
    methods run here in committed transactions; the rest of optuna 2.10's RDB storage works on SQLAlchemy 2.
    """
    if not url:
        return None
    import optuna
    import sqlalchemy

    if optuna.__version__.startswith("2.") and int(sqlalchemy.__version__.split(".")[0]) >= 2:
        _patch_optuna2_version_manager()
    url = str(url)
    if url.startswith("sqlite:///") and url != "sqlite:///:memory:":
        Path(url[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)  # SQLite creates no folders
    return optuna.storages.RDBStorage(url)


def _patch_optuna2_version_manager() -> None:
    import alembic.migration
    from optuna.storages._rdb import storage as rdb

    vm = rdb._VersionManager
    if getattr(vm, "_setr_sqlalchemy2", False):
        return

    def _init_alembic(self) -> None:
        with self.engine.begin() as conn:  # commits the stamp
            context = alembic.migration.MigrationContext.configure(conn)
            if context.get_current_revision() is not None:
                return
            revision = self.get_head_version() if self._is_alembic_supported() else self._get_base_version()
            context.stamp(self._create_alembic_script(), revision)

    def get_current_version(self) -> str:
        with self.engine.connect() as conn:  # closed: no transaction left holding the lock
            version = alembic.migration.MigrationContext.configure(conn).get_current_revision()
        assert version is not None
        return version

    vm._init_alembic = _init_alembic
    vm.get_current_version = get_current_version
    vm._setr_sqlalchemy2 = True


# -------------------------------------------------------------------------------------------- output
def collect_metrics(callback_metrics: Mapping[str, Any], prefixes=("train/", "val/", "test/")) -> dict[str, float]:
    out = {}
    for k, v in callback_metrics.items():
        if not k.startswith(prefixes):
            continue
        v = v.item() if isinstance(v, torch.Tensor) and v.numel() == 1 else v
        if isinstance(v, (int, float)):
            out[k] = float(v)
    return dict(sorted(out.items()))


def write_metrics(metrics: Mapping[str, Any], output_dir: str | Path, name: str = "metrics.json") -> Path:
    path = Path(output_dir) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(metrics, indent=2, default=_json_default) + "\n")
    return path


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


def hydra_error_line(e: BaseException) -> str:
    """One line for a Hydra composition error (unknown group option, bad override, unknown key)."""
    from hydra.errors import MissingConfigException

    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    if isinstance(e, MissingConfigException):
        line = lines[0] if lines else "config not found"
        if e.options:
            line += f"; available: {', '.join(sorted(e.options))}"
        return line
    line = " ".join(lines[:3]) or type(e).__name__
    if e.__cause__ is not None:
        cause = str(e.__cause__).strip().splitlines()
        if cause and cause[0] not in line:
            line += f" ({cause[0]})"
    return line


def run_hydra_main(main: Callable[[], Any]) -> None:
    """Call a ``@hydra.main`` function so that a config Hydra cannot compose ends in ONE ``error: ...`` line
    on stderr and exit code 2 (Hydra itself prints several lines and exits 1)."""
    from hydra.errors import HydraException

    os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra re-raises instead of printing; we report below
    try:
        main()
    except HydraException as e:
        print(f"error: {hydra_error_line(e)}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
