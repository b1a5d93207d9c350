"""The commands: ``setr-train``, ``setr-eval``, ``setr-predict``, ``setr-export``, ``setr-bench`` and
``setr-summary`` (console scripts of pyproject.toml, usable from any working folder once the package is installed),
and the same functions behind ``python src/<task>.py`` and ``python -m setr.export``.

Each command composes ``conf/<task>.yaml`` from the project's one config folder (:data:`setr.paths.CONF_DIR`),
defaults ``$PROJECT_ROOT`` to the project (runs go to the project's ``logs/`` whatever the working folder) and
runs through :func:`setr.utils.launch.launch` (one ``error: ...`` line and exit code 2 for a mistake the user can
fix). ``setr-train`` rewrites ``resume=auto`` first (:func:`setr.utils.resume.apply_auto_resume`). Each command is
made by :func:`command`.
``setr-convert`` is :func:`setr.checkpoint.convert.main` (argparse, no Hydra).

Hydra names a job (``hydra.job.name``: the W&B group, the names of DDP children) after the module of its task
function: ``train`` for ``src/train.py`` run as a script. :func:`command` gives each task function here the
module ``setr.cli.<task>``, so every way of starting a task gives its job the same name as before.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from setr import missing_dependency

try:
    import hydra
except ModuleNotFoundError as e:
    missing_dependency(e)

from setr.paths import CONF_DIR, conf_dir, use_project_root
from setr.utils.launch import launch


def run_task(task: str, cfg: Any) -> Any:
    """``setr.tasks.<task>.run(cfg)``, the task module imported only now (an error line or ``--help`` never pays
    for torch and Lightning)."""
    if task == "train":
        from setr.tasks.train import run
    elif task == "evaluate":
        from setr.tasks.evaluate import run
    elif task == "predict":
        from setr.tasks.predict import run
    elif task == "export":
        from setr.tasks.export import run
    elif task == "bench":
        from setr.tasks.bench import run
    elif task == "summary":
        from setr.tasks.summary import run
    else:
        raise ValueError(f"no task {task!r}")
    return run(cfg)


def command(job: str, task: str, doc: str, prepare: Callable[[list[str]], list[str]] | None = None
            ) -> Callable[[], None]:
    """The command of ``conf/<job>.yaml``: ``setr.tasks.<task>.run`` as a ``@hydra.main`` function whose Hydra job is
    named ``job`` (see the module docstring), run through :func:`launch` with ``$PROJECT_ROOT`` defaulted and
    ``conf/`` checked first (one line when it is not there, instead of Hydra's "primary config directory not
    found"). The task module is imported when its job runs: ``--help`` or a bad override never loads it."""

    def task_function(cfg: Any) -> Any:
        return run_task(task, cfg)  # train: the metric an Optuna sweep optimises

    task_function.__module__ = f"{__name__}.{job}"  # Hydra names the job after the last part of this
    task_function.__qualname__ = task_function.__name__ = f"{job}_main"
    main = hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name=job)(task_function)

    def run() -> None:
        use_project_root()

        def checked() -> None:
            conf_dir()
            main()

        launch(checked, prepare=prepare)

    run.__name__ = run.__qualname__ = task
    run.__doc__ = doc
    return run


def _auto_resume(argv: list[str]) -> list[str]:
    from setr.utils.resume import apply_auto_resume

    return apply_auto_resume(argv)


train = command("train", "train", "``setr-train`` / ``python src/train.py``: train SETR (``conf/train.yaml``).",
                prepare=_auto_resume)
evaluate = command("eval", "evaluate", "``setr-eval`` / ``python src/eval.py``: evaluate a checkpoint.")
predict = command("predict", "predict", "``setr-predict`` / ``python src/predict.py``: label images with a checkpoint.")
export = command("export", "export", "``setr-export`` / ``python src/export.py`` / ``python -m setr.export``: ONNX or "
                 "TorchScript.")
bench = command("bench", "bench", "``setr-bench`` / ``python src/bench.py``: speed against a plain baseline.")
summary = command("summary", "summary", "``setr-summary`` / ``python src/summary.py``: parameters and GFLOPs.")
