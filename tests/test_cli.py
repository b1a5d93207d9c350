"""The installed commands (``setr-train``, ``setr-eval``, ..., pyproject.toml ``[project.scripts]``) run from any
working folder exactly as ``python src/<task>.py`` from the project root; the project's one ``conf/`` location."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline import ROOT, TINY, last_json
from setr.errors import SETRConfigError

BIN = Path(sys.executable).parent


def _command(name: str, *args: str, cwd: Path, timeout: int = 1200) -> subprocess.CompletedProcess:
    """``<venv>/bin/<name> args`` started in ``cwd``, with no ``$PROJECT_ROOT`` of the caller's."""
    script = BIN / name
    assert script.is_file(), f"{script} missing: pip install -e . (pyproject.toml [project.scripts])"
    env = {k: v for k, v in os.environ.items() if k != "PROJECT_ROOT"}
    env.update(PYTHONUNBUFFERED="1", WANDB_MODE="offline")
    return subprocess.run([str(script), *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env,
                          stdin=subprocess.DEVNULL)


@pytest.mark.slow
def test_setr_train_from_another_folder(tmp_path):
    """Trains from a folder that is not the project: the config is the project's, the run is written under
    ``paths.log_dir`` with Hydra's record (job name ``train``, as src/train.py), and nothing is written into the
    working folder."""
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    log_dir = tmp_path / "logs"
    proc = _command("setr-train", *TINY, "trainer.max_steps=2", "trainer.val_check_interval=2",
                    f"paths.log_dir={log_dir}", cwd=cwd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert last_json(proc)["global_step"] == 2
    (run,) = (log_dir / "train" / "runs").iterdir()
    assert (run / "checkpoints" / "last.ckpt").is_file() and (run / "metrics.json").is_file()
    from omegaconf import OmegaConf

    assert OmegaConf.load(run / ".hydra" / "hydra.yaml").hydra.job.name == "train"
    assert list(cwd.iterdir()) == []


@pytest.mark.slow
def test_paths_default_to_the_project_from_any_folder(tmp_path):
    """``$PROJECT_ROOT`` unset and another working folder: ``logs/``, ``data/`` and ``weights/`` are the project's."""
    proc = _command("setr-summary", "--cfg", "job", "--resolve", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for line in (f"root_dir: {ROOT}", f"log_dir: {ROOT}/logs", f"data_dir: {ROOT}/data"):
        assert line in proc.stdout.splitlines() or f"  {line}" in proc.stdout.splitlines(), proc.stdout[-2000:]


@pytest.mark.slow
def test_setr_eval_bad_key_one_line(tmp_path):
    proc = _command("setr-eval", "no_such_key=1", cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    errors = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(errors) == 1 and errors[0].startswith("error: ") and "no_such_key" in errors[0], proc.stderr


def test_setr_convert_help(tmp_path):
    proc = _command("setr-convert", "--help", cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("usage:") and "--data" in proc.stdout and "SRC" in proc.stdout


@pytest.mark.slow
def test_setr_summary_of_a_paper_preset_needs_no_weights(tmp_path):
    """``experiment=`` works for summary as for train: the preset's model and data (ViT-L MLA, 512 crops, 150
    classes: the counts of ``model=setr_mla data=ade20k``) with no encoder weights anywhere."""
    proc = _command("setr-summary", "experiment=ade20k_mla_b16", "summary.flops=false",
                    f"paths.weights_dir={tmp_path / 'no_weights'}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert last_json(proc) == {"total": 310_184_086, "encoder": 307_567_616, "decode_head": 2_462_870,
                               "auxiliary_heads": 4 * 256 * 150, "gflops": None}
    assert "SETR-mla" in proc.stdout and "data=ade20k" in proc.stdout


@pytest.mark.slow
def test_ddp_child_command_of_a_console_script_runs(tmp_path, monkeypatch):
    """Lightning's rank-1 command, built from the command line of a parent started as ``setr-train``: the
    console script itself, run by this Python, composes the job's config in the job's folder."""
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig
    from lightning.pytorch.strategies.launchers import subprocess_script as pl_launcher
    from omegaconf import open_dict

    from setr.paths import CONF_DIR
    from setr.utils.distributed import patch_lightning_hydra_ddp

    overrides = [*TINY, "optimizer.lr=0.02"]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=overrides, return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(tmp_path / "run")
        cfg.hydra.runtime.cwd = str(tmp_path)
        cfg.hydra.job.name = "train"
        cfg.hydra.overrides.task = overrides
    monkeypatch.setattr(HydraConfig.instance(), "cfg", None)
    HydraConfig.instance().set_config(cfg)
    monkeypatch.setattr("sys.argv", [str(BIN / "setr-train"), *overrides])
    monkeypatch.setattr(pl_launcher, "_hydra_subprocess_cmd", pl_launcher._hydra_subprocess_cmd)
    patch_lightning_hydra_ddp()
    command, cwd = pl_launcher._hydra_subprocess_cmd(1)
    assert command[:2] == [sys.executable, str(BIN / "setr-train")] and cwd == str(tmp_path)

    proc = subprocess.run([*command, "--cfg", "all"], cwd=cwd, capture_output=True, text=True, timeout=600,
                          stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr[-2000:]
    child = yaml.safe_load(proc.stdout)
    assert child["optimizer"]["lr"] == 0.02 and child["hydra"]["run"]["dir"] == str(tmp_path / "run")
    assert child["hydra"]["job"]["name"] == "train_rank1" and child["hydra"]["output_subdir"] is None


def test_conf_dir_missing_is_one_line(tmp_path, monkeypatch):
    """An install without the checkout's conf/ (``pip install .``): one line naming the folder."""
    import setr.paths

    assert setr.paths.conf_dir() == ROOT / "conf" and (setr.paths.CONF_DIR / "train.yaml").is_file()
    monkeypatch.setattr(setr.paths, "CONF_DIR", tmp_path / "conf")
    with pytest.raises(SETRConfigError, match=r"conf.* is not there") as e:
        setr.paths.conf_dir()
    assert str(tmp_path / "conf") in str(e.value) and "\n" not in str(e.value)


def test_entry_points_are_the_cli_functions():
    """``python src/<task>.py`` and ``setr-<task>`` run the same function of :mod:`setr.cli`."""
    import tomllib

    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    for task in ("train", "eval", "predict", "export", "bench", "summary"):
        module, func = scripts[f"setr-{task}"].split(":")
        assert module == "setr.cli"
        shim = (ROOT / "src" / f"{task}.py").read_text()
        assert f"from setr.cli import {func}\n" in shim and f"    {func}()\n" in shim
    assert scripts["setr-convert"] == "setr.checkpoint.convert:main"


@pytest.mark.parametrize("module", ["omegaconf", "hydra"])
def test_a_python_without_the_dependencies_gets_one_line(module):
    """``python src/train.py`` with a Python that lacks the project's packages (not the venv's): one line saying
    so and what to run, exit code 2, no traceback. The package is hidden from the import system here."""
    code = (f"import sys, runpy; sys.modules[{module!r}] = None; sys.argv = ['src/train.py']; "
            "runpy.run_path('src/train.py', run_name='__main__')")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          stdin=subprocess.DEVNULL)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"error: No module named {module!r} in "), proc.stderr
    assert "make install" in lines[0] and ".venv/bin/setr-*" in lines[0]


def test_the_library_keeps_import_errors_but_adds_the_advice():
    """Imported as a library (not an entry-point script), a missing package is still an ImportError."""
    code = ("import sys; sys.modules['omegaconf'] = None\n"
            "try:\n    import setr\nexcept ModuleNotFoundError as e:\n    print('name', e.name, '|', e)\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          stdin=subprocess.DEVNULL)
    assert proc.returncode == 0 and proc.stdout.startswith("name omegaconf | No module named 'omegaconf' in ")
