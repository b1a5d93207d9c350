"""Resuming: ``resume=auto``, ``resume=<run dir>`` and ``ckpt_path``, without losing or mixing up a run.

A run is continued only with the model its weights are. ``resume=auto`` composes the config of the command line
once, before Hydra runs it, and continues the newest run whose task and ``experiment`` / ``model`` / ``data``
choices (recorded by Hydra in ``<run dir>/.hydra/``) are the command's AND whose checkpoint record
(:class:`setr.checkpoint.ModelRecord`: the model config with the class count, and the training crop) is the one
the command composes, up to the run settings in :data:`RUN_SETTINGS`: a run of another head, encoder or class
count is never picked. It points ``hydra.run.dir`` at that run, so it continues there: same CSV, same W&B run,
global step carried on. ``ckpt_path=`` and ``resume=<run dir>`` refuse a checkpoint of another model with one
line naming the keys that differ (:func:`check_resume`).

A run folder is a candidate as long as one of its checkpoints is readable: a damaged ``last.ckpt`` (truncated,
empty) or a missing one (a kill between the best checkpoint and ``last.ckpt``) falls back to the newest readable
checkpoint of the run, with one line saying so (:func:`choose_checkpoint`).

A finished run (its checkpoint's global step reached the composed ``trainer.max_steps``) is never rewritten:
resuming it says so, prints its stored ``metrics.json`` as the final JSON line and exits 0. Raising
``trainer.max_steps`` continues it.

Checkpoints are only peeked at here (``torch.load(mmap=True)``: the pickle is read, the tensors stay on disk), so
choosing among GB-sized files costs little.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from setr.errors import SETRConfigError
from setr.paths import conf_dir

log = logging.getLogger("setr")

IDENTITY = ("task_name", "experiment", "model", "data")

# Keys of a record's ``model`` node that are run settings, not what the weights are: a run may be resumed with
# them changed (e.g. activation checkpointing switched on after an out-of-memory error). Paths under ``model.``;
# a key named by its last part (``drop_path_rate``) matches at any depth.
RUN_SETTINGS = frozenset({
    "compile", "loss_path", "resize", "channels_last", "encoder.grad_checkpointing", "encoder.fused_attn",
    "encoder.freeze", "encoder.out_indices_presets", "encoder.pretrained",
})
RUN_SETTING_NAMES = frozenset({"drop_rate", "attn_drop_rate", "drop_path_rate", "dropout", "dropout_ratio",
                               "loss_weight"})


# ------------------------------------------------------------------------------------------ identity
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


def weights_of(record: Any) -> dict[str, Any]:
    """What the weights of a record are, flat (``model.head.name``: value, ..., ``crop_size``): its model config
    (the class count included) without :data:`RUN_SETTINGS`, and the training crop (the size the position
    embeddings were built for)."""
    from setr.checkpoint import ModelRecord

    if isinstance(record, ModelRecord):
        record = record.to_dict()
    flat: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, Mapping) and node:
            for k, v in node.items():
                key = f"{prefix}.{k}"
                if key[len("model."):] in RUN_SETTINGS or str(k) in RUN_SETTING_NAMES:
                    continue
                walk(v, key)
        else:
            flat[prefix] = list(node) if isinstance(node, tuple) else node

    walk(record.get("model") or {}, "model")
    crop = record.get("crop_size")
    flat["crop_size"] = [int(crop), int(crop)] if isinstance(crop, int) else list(crop or [])
    return flat


def record_diff(stored: Any, composed: Any, limit: int = 4) -> list[str]:
    """``["model.head.name (pup vs naive)", ...]``: where the weights of record ``stored`` (a checkpoint's) and
    ``composed`` (the config's) differ; empty when they are the same model."""
    a, b = weights_of(stored), weights_of(composed)
    keys = sorted(set(a) | set(b), key=lambda k: (not k.endswith((".name", ".num_classes")), k == "crop_size", k))
    diff = [f"{k} ({_show(a.get(k, '<absent>'))} vs {_show(b.get(k, '<absent>'))})" for k in keys
            if a.get(k, "<absent>") != b.get(k, "<absent>")]
    return diff[:limit] + ([f"and {len(diff) - limit} more"] if len(diff) > limit else [])


def _show(v: Any) -> str:
    text = json.dumps(v) if isinstance(v, (list, dict)) else str(v)
    return text if len(text) <= 40 else text[:37] + "..."


def config_record(cfg: DictConfig) -> Any:
    """The :class:`ModelRecord` a composed config trains (class names as the config gives them)."""
    from setr.checkpoint import ModelRecord

    return ModelRecord.from_config(cfg)


# ------------------------------------------------------------------------------------------ checkpoints
@dataclasses.dataclass
class Peek:
    """What :func:`peek` read of a checkpoint: its global step and model record (None: not a project checkpoint)."""

    step: int
    record: dict[str, Any] | None


_PEEKS: dict[tuple[str, int, int], Peek] = {}


def peek(path: str | Path, what: str = "ckpt_path") -> Peek:
    """The global step and record of a checkpoint, read with its tensors memory-mapped (nothing read in full);
    cached per file version. An unreadable file raises one :class:`SETRConfigError` line naming it and why
    (:func:`setr.files.read_torch_file`: missing, empty, truncated, not a torch file, ...)."""
    from setr.files import read_torch_file

    path = Path(path).expanduser()
    if not path.is_file():
        read_torch_file(path, what=what)  # raises "not found"
    st = path.stat()
    key = (str(path.resolve()), st.st_mtime_ns, st.st_size)
    if key in _PEEKS:
        return _PEEKS[key]
    ckpt = read_torch_file(path, what=what, mmap=True)
    if not isinstance(ckpt, Mapping):
        raise SETRConfigError(f"{what}: {path} is not a checkpoint written by setr-train (no state_dict)")
    record = (ckpt.get("hyper_parameters") or {}).get("record")
    step = ckpt.get("global_step")
    _PEEKS[key] = Peek(int(step) if isinstance(step, int) else 0, dict(record) if isinstance(record, Mapping) else None)
    return _PEEKS[key]


@dataclasses.dataclass
class Choice:
    """The checkpoint a run continues from; ``note``: one line when it is not ``last.ckpt`` (why)."""

    path: Path
    step: int
    record: dict[str, Any]
    note: str | None = None


def choose_checkpoint(run_dir: Path, what: str = "resume") -> tuple[Choice | None, list[str]]:
    """The newest readable checkpoint of a run folder (the highest global step; ``last.ckpt`` on a tie), and one
    reason per checkpoint that could not be read. A damaged ``last.ckpt`` (a write cut short) or a missing one (a
    kill between the best checkpoint and ``last.ckpt``) falls back to the newest other one, and ``note`` says so."""
    folder = Path(run_dir) / "checkpoints"
    files = sorted(folder.glob("*.ckpt"), key=lambda p: (p.name != "last.ckpt", p.name)) if folder.is_dir() else []
    found: list[tuple[Path, Peek]] = []
    bad: dict[str, str] = {}
    for f in files:
        try:
            info = peek(f, what)
        except SETRConfigError as e:
            bad[f.name] = _why(str(e), f)
            continue
        if info.record is None:
            bad[f.name] = "no model record: not a checkpoint written by setr-train"
            continue
        found.append((f, info))
    reasons = [f"{name}: {why}" for name, why in bad.items()]
    if not found:
        return None, reasons
    path, info = max(found, key=lambda fi: (fi[1].step, fi[0].name == "last.ckpt"))
    note = None
    if path.name != "last.ckpt":
        if "last.ckpt" in bad:
            why = f"its last.ckpt is not a readable checkpoint ({bad['last.ckpt']})"
        elif not (folder / "last.ckpt").exists():
            why = "it has no last.ckpt (stopped between two checkpoint writes)"
        else:
            why = f"it is newer than last.ckpt (step {peek(folder / 'last.ckpt').step})"
        note = f"{what}: {Path(run_dir)}: {why}; continuing from {path.name} (step {info.step}), the newest " \
               "readable checkpoint of the run"
    return Choice(path, info.step, info.record or {}, note), reasons


def _why(message: str, path: Path) -> str:
    """The reason in a :func:`peek` error line, without the file's name."""
    tail = message.split(str(path), 1)[-1].strip(" :") if str(path) in message else message
    for lead in ("is not a readable checkpoint:", "is not a checkpoint written by setr-train"):
        if tail.startswith(lead):
            tail = tail[len(lead):].strip() or lead
    return tail[1:-1] if tail.startswith("(") and tail.endswith(")") else tail


def candidate_runs(log_dir: Path, task_name: str) -> list[Path]:
    """Run folders with a checkpoint (any ``checkpoints/*.ckpt``) under ``<log_dir>/<task_name>/{runs,multiruns}``,
    the one with the newest checkpoint first."""
    base = Path(log_dir) / task_name
    newest: dict[Path, float] = {}
    for p in [*base.glob("runs/*/checkpoints/*.ckpt"), *base.glob("multiruns/*/*/checkpoints/*.ckpt")]:
        try:
            t = p.stat().st_mtime
        except OSError:
            continue
        run = p.parent.parent
        newest[run] = max(newest.get(run, t), t)
    return sorted(newest, key=newest.__getitem__, reverse=True)


def find_run(log_dir: str | Path, identity: Mapping[str, Any], record: Any = None,
             skipped: list[str] | None = None) -> tuple[Path, Choice] | None:
    """The newest run under ``log_dir`` with this ``identity``, a readable checkpoint and, given ``record``, the
    same model (:func:`record_diff`). ``skipped`` collects one line per run of this identity that was passed over."""
    for run_dir in candidate_runs(Path(log_dir), str(identity["task_name"])):
        if identity_of_run(run_dir) != dict(identity):
            continue
        choice, reasons = choose_checkpoint(run_dir)
        if choice is None:
            if skipped is not None:
                skipped.append(f"{run_dir}: no readable checkpoint ({'; '.join(reasons)})")
            continue
        diff = record_diff(choice.record, record) if record is not None else []
        if diff:
            if skipped is not None:
                skipped.append(f"{run_dir}: another model at {', '.join(diff)}")
            continue
        return run_dir, choice
    return None


# ------------------------------------------------------------------------------------------ finished runs
def max_steps_of(cfg: DictConfig) -> int | None:
    """The composed ``trainer.max_steps`` when it is a step budget (a positive int), else None."""
    value = OmegaConf.select(cfg, "trainer.max_steps", default=None)
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def finished_metrics(run_dir: Path, choice: Choice, max_steps: int, what: str) -> dict[str, Any]:
    """The stored final metrics of a finished run, after one line saying it is finished."""
    stored = Path(run_dir) / "metrics.json"
    head = (f"{what}: {run_dir} is finished (step {choice.step} of trainer.max_steps={max_steps}); nothing is "
            "trained or written (raise trainer.max_steps to train it further)")
    try:
        metrics = json.loads(stored.read_text())
        if not isinstance(metrics, dict):
            raise ValueError("not a JSON object")
        print(f"{head}; its final metrics: {stored}", file=sys.stderr, flush=True)
    except (OSError, ValueError) as e:
        why = "missing" if isinstance(e, FileNotFoundError) else f"unreadable ({e})"
        print(f"{head}; its metrics.json is {why} (stopped before writing it): score it with python src/eval.py "
              f"ckpt_path={choice.path}", file=sys.stderr, flush=True)
        metrics = {"global_step": float(choice.step)}
    return metrics


# ------------------------------------------------------------------------------------------ command line
def _compose(overrides: Iterable[str], config_name: str) -> DictConfig:
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    try:
        with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
            return compose(config_name, overrides=list(overrides), return_hydra_config=True)
    finally:
        GlobalHydra.instance().clear()  # @hydra.main initialises its own


def _stop_finished(run_dir: Path, choice: Choice, cfg: DictConfig, what: str) -> None:
    """Exit 0 with the run's stored metrics as the final JSON line when it is finished (before Hydra writes
    anything into its folder)."""
    max_steps = max_steps_of(cfg)
    if max_steps is None or choice.step < max_steps:
        return
    from setr.utils.output import print_last_line

    print_last_line(finished_metrics(run_dir, choice, max_steps, what))
    raise SystemExit(0)


def apply_auto_resume(argv: list[str], config_name: str = "train") -> list[str]:
    """Rewrite the command line for ``resume=auto`` / ``resume=<run dir>`` (run before Hydra parses it): add
    ``hydra.run.dir`` of the run to continue, or leave it unchanged, with one line saying why; a finished run
    ends the process here (exit 0, its metrics as the final line). Multiruns resume per job in their own folders
    (``resume`` is then handled by :func:`resolve_ckpt_path`)."""
    overrides = [a for a in argv[1:] if not a.startswith("-")]
    args = {a.split("=", 1)[0]: a.split("=", 1)[1] for a in overrides if "=" in a}
    value = args.get("resume")
    if value in (None, "null", "None", "false") or "hydra.run.dir" in args or "-m" in argv or "--multirun" in argv:
        return argv
    cfg = _compose(overrides, config_name)
    if value != "auto":
        run_dir = Path(value).expanduser()
        what = f"resume={value}"
        if not (run_dir / "checkpoints").is_dir():
            raise SETRConfigError(f"{what}: {run_dir} is not a run folder (no checkpoints/ in it)")
        choice, reasons = choose_checkpoint(run_dir, what)
        if choice is None:
            raise SETRConfigError(f"{what}: no readable checkpoint in {run_dir / 'checkpoints'}"
                                  + (f" ({'; '.join(reasons)})" if reasons else ""))
        _refuse_other_model(choice, config_record(cfg), what)
        _stop_finished(run_dir, choice, cfg, what)
        return [*argv, f"hydra.run.dir={run_dir.resolve()}"]
    identity = run_identity(cfg.get("task_name"), cfg.hydra.runtime.choices)
    log_dir = Path(str(cfg.paths.log_dir))
    what = " ".join(f"{k}={v}" for k, v in identity.items() if k != "task_name" and v is not None)
    skipped: list[str] = []
    found = find_run(log_dir, identity, config_record(cfg), skipped)
    if found is None:
        passed = f" (passed over: {'; '.join(skipped[:3])}{'; ...' if len(skipped) > 3 else ''})" if skipped else ""
        print(f"resume=auto: no {identity['task_name']} run of {what} with a last.ckpt under {log_dir} (or another "
              f"readable checkpoint) of this model{passed}; starting a new run", file=sys.stderr, flush=True)
        return argv
    run_dir, choice = found
    _stop_finished(run_dir, choice, cfg, "resume=auto")
    print(f"resume=auto: continuing {run_dir} ({what})", file=sys.stderr, flush=True)
    return [*argv, f"hydra.run.dir={run_dir.resolve()}"]


def _refuse_other_model(choice: Choice, record: Any, what: str) -> None:
    diff = record_diff(choice.record, record)
    if diff:
        raise SETRConfigError(f"{what}: the checkpoint's model differs from the config at {', '.join(diff)} "
                              f"({choice.path}); resume it with the model it was trained with, or start a new run")


# ------------------------------------------------------------------------------------------ inside the job
def resolve_ckpt_path(cfg: DictConfig) -> str | None:
    """The checkpoint ``trainer.fit`` continues from: ``ckpt_path`` (read here: a missing or damaged file is one
    line naming it and why), else with ``resume`` set the newest readable checkpoint of the run folder
    (``last.ckpt``, or the fallback :func:`choose_checkpoint` announces): a re-queued SLURM job, or the folder
    ``resume=auto`` chose."""
    if cfg.get("ckpt_path"):
        p = Path(str(cfg.ckpt_path)).expanduser()
        if p.is_dir():
            raise SETRConfigError(f"ckpt_path: {p} is a folder; name a checkpoint file, or continue the run "
                                  f"with resume={p}")
        peek(p, "ckpt_path")
        return str(p)
    if cfg.get("resume"):
        run_dir = Path(cfg.paths.output_dir)
        choice, reasons = choose_checkpoint(run_dir, "resume")
        if choice is None:
            if reasons:  # checkpoints that cannot be read: starting over in their folder would lose the run
                raise SETRConfigError(f"resume: no readable checkpoint in {run_dir / 'checkpoints'} "
                                      f"({'; '.join(reasons)}); start a new run without resume")
            return None
        from setr.utils.distributed import is_rank_zero

        if choice.note and is_rank_zero():
            log.warning("%s", choice.note)
        log.info("resuming from %s", choice.path)
        return str(choice.path)
    return None


def check_resume(cfg: DictConfig, ckpt_path: str | Path, record: Any) -> dict[str, Any] | None:
    """Before ``trainer.fit`` continues ``ckpt_path``: refuse a checkpoint of another model than ``record`` (the
    config's) with one line naming the keys that differ; for a finished run (the checkpoint's global step at or
    past ``trainer.max_steps``) return its stored final metrics after one line saying so (nothing is to be
    trained or written), else None."""
    what = "ckpt_path" if cfg.get("ckpt_path") else "resume"
    path = Path(ckpt_path)
    info = peek(path, what)
    if info.record is None:
        raise SETRConfigError(f"{what}: {path} is not a checkpoint written by setr-train (no model record)")
    choice = Choice(path, info.step, info.record)
    _refuse_other_model(choice, record, what)
    max_steps = max_steps_of(cfg)
    if max_steps is None or info.step < max_steps:
        return None
    return finished_metrics(path.parent.parent, choice, max_steps, what)


def newest_checkpoint(log_dir: str | Path, task_name: str = "train") -> Path | None:
    """The newest ``checkpoints/last.ckpt`` of any run under ``<log_dir>/<task_name>`` (the notebooks' default)."""
    for run in candidate_runs(Path(log_dir), task_name):
        if (run / "checkpoints" / "last.ckpt").is_file():
            return run / "checkpoints" / "last.ckpt"
    return None
