"""Which process am I, and Lightning's DDP child processes under Hydra."""

from __future__ import annotations

import os
import sys


def is_rank_zero() -> bool:
    """True in the process that prints, writes reports and logs (before or without Lightning's strategy)."""
    # SLURM_PROCID: under SLURM (trainer=slurm, hydra/launcher=slurm) SLURM starts every rank itself and Lightning
    # sets no LOCAL_RANK / RANK in the environment
    return int(os.environ.get("LOCAL_RANK", os.environ.get("RANK", "0"))) == 0 and \
        int(os.environ.get("NODE_RANK", "0")) == 0 and int(os.environ.get("SLURM_PROCID", "0")) == 0


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
            *QUIET_RANK,
        ]
        return command, get_original_cwd()

    pl_launcher._hydra_subprocess_cmd = hydra_ddp_cmd
    # the children find their parent by this (setr.training.preemption.watch_parent: a child whose rank 0 died
    # during start-up exits instead of waiting 30 minutes in the rendezvous)
    if not is_ddp_child():
        os.environ["SETR_DDP_PARENT_PID"] = str(os.getpid())


def is_ddp_child() -> bool:
    """True in a DDP process Lightning's subprocess launcher started for ``LOCAL_RANK > 0``: rank 0 of this node
    is its parent and exported ``SETR_DDP_PARENT_PID`` (:func:`patch_lightning_hydra_ddp`) before starting it."""
    parent = os.environ.get("SETR_DDP_PARENT_PID", "")
    return parent.isdigit() and int(parent) != os.getpid() and int(os.environ.get("LOCAL_RANK", "0")) > 0


# Hydra overrides of a process that is not global rank 0: it writes into rank 0's run folder, so it keeps no
# .hydra record, no log file and prints no config of its own.
QUIET_RANK = (
    "hydra.output_subdir=null",
    "hydra/job_logging=disabled",
    "~hydra.job_logging.handlers",  # conf/hydra/default.yaml's file handler would be left half-defined
    "hydra/hydra_logging=disabled",
    "extras.print_config=false",
)


def quiet_rank_argv(argv: list[str]) -> list[str]:
    """``argv`` with :data:`QUIET_RANK` added in a process started as a rank other than 0 by its launcher
    (``NODE_RANK`` / ``RANK`` / ``SLURM_PROCID``: one launch per node, torchrun, ``srun``), unless already there
    (Lightning's own DDP children get them from :func:`patch_lightning_hydra_ddp`) or in a ``-m`` sweep.

    Without them every node's launch wrote ``.hydra`` and truncated ``train.log`` in the shared run folder given
    by ``hydra.run.dir`` (or made a folder of its own, empty but for those files)."""
    if is_rank_zero() or "-m" in argv or "--multirun" in argv or QUIET_RANK[0] in argv:
        return argv
    return [*argv, *QUIET_RANK]
