"""The notebooks run headless from a clean kernel, from any working folder, and are stored without outputs.

Each notebook's settings are in its first code cell, tagged ``parameters`` (01_data: ``MY_DATA``,
``MY_NUM_CLASSES``; 02_predict: ``CKPT``), all ``None`` as committed. The tests set them the way papermill does:
a cell tagged ``injected-parameters`` inserted right after it (:func:`with_parameters`). The kernel starts in a
scratch folder (not the project root, not ``notebooks/``): the notebooks find ``conf/`` through ``setr.paths``.
"""

from __future__ import annotations

import ast
import json
import re
import sys
from pathlib import Path

import pytest

import fake_datasets as fake
from conftest import write_tiny_checkpoint
from pipeline import ROOT

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

PARAMETERS = {"01_data.ipynb": {"MY_DATA", "MY_NUM_CLASSES"}, "02_predict.ipynb": {"CKPT"}}
ANSI = re.compile(r"\x1b\[[0-9;]*m")


@pytest.fixture
def venv_kernel(tmp_path, monkeypatch) -> str:
    """A ``python3`` kernel spec that starts *this* interpreter (the venv's): the spec shipped with ipykernel
    says plain ``python``, which may be another Python on PATH. JUPYTER_PATH entries come first in the search."""
    kernel_dir = tmp_path / "jupyter" / "kernels" / "python3"
    kernel_dir.mkdir(parents=True)
    spec = {"argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            "display_name": "Python 3 (setr venv)", "language": "python"}
    (kernel_dir / "kernel.json").write_text(json.dumps(spec))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path / "runtime"))
    monkeypatch.setenv("IPYTHONDIR", str(tmp_path / "ipython"))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    return "python3"


@pytest.fixture
def elsewhere(tmp_path) -> Path:
    """The kernel's working folder: neither the project root nor notebooks/."""
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    return cwd


@pytest.fixture
def project_with_fake_data(tmp_path, monkeypatch) -> Path:
    """PROJECT_ROOT (hence paths.data_dir, and the root of the notebooks' relative paths) pointing at fake ADE20K
    and Cityscapes trees and a data=folder dataset under "my data" (a space: the Hydra override is quoted);
    Pascal Context absent, so the notebook's real-data section runs both its branches."""
    project = tmp_path / "project"
    fake.make_ade20k(project / "data" / "ade20k", n_train=1, n_val=2)
    fake.make_cityscapes(project / "data" / "cityscapes", n_train=1, n_val=2)
    fake.make_folder(project / "my data", n_train=2, n_val=1)
    monkeypatch.setenv("PROJECT_ROOT", str(project))
    return project


def parameters_cell(nb) -> int:
    tagged = [i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1, "one cell tagged 'parameters'"
    return tagged[0]


def with_parameters(nb, **params):
    """``nb`` with ``name = value`` lines in a cell right after its ``parameters`` cell (papermill's way)."""
    source = "\n".join(f"{k} = {v!r}" for k, v in params.items())
    nb.cells.insert(parameters_cell(nb) + 1,
                    nbformat.v4.new_code_cell(source, metadata={"tags": ["injected-parameters"]}))
    return nb


@pytest.mark.parametrize("name", PARAMETERS)
def test_notebook_is_stored_without_outputs(name):
    nb = nbformat.read(ROOT / "notebooks" / name, as_version=4)
    nbformat.validate(nb)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, f"{name}: clear the outputs before committing"


@pytest.mark.parametrize("name", PARAMETERS)
def test_settings_are_the_first_code_cell_and_unset(name):
    """The user's settings sit at the top, tagged for injection, and no personal path is committed."""
    nb = nbformat.read(ROOT / "notebooks" / name, as_version=4)
    i = parameters_cell(nb)
    assert i == next(j for j, c in enumerate(nb.cells) if c.cell_type == "code"), "the first code cell"
    assigned = {t.id: node.value for node in ast.parse(nb.cells[i].source).body if isinstance(node, ast.Assign)
                for t in node.targets}
    assert set(assigned) == PARAMETERS[name]
    assert all(isinstance(v, ast.Constant) and v.value is None for v in assigned.values())


def run(name: str, kernel: str, cwd: Path, fails: bool = False, last_cells: int | None = None, **params):
    """Run notebooks/<name> from a clean kernel started in ``cwd``, with ``params`` injected; returns the
    executed notebook. ``fails``: a cell must stop the run (CellExecutionError). ``last_cells``: run only the
    settings, the set-up cell after them and that many cells at the end (one section)."""
    nb = with_parameters(nbformat.read(ROOT / "notebooks" / name, as_version=4), **params)
    if last_cells:
        setup = parameters_cell(nb) + 2  # parameters, injected-parameters, set-up
        nb.cells = nb.cells[:setup + 1] + nb.cells[-last_cells:]
    assert cwd.resolve() not in (ROOT, ROOT / "notebooks")
    client = nbclient.NotebookClient(nb, kernel_name=kernel, timeout=600, startup_timeout=600,
                                     resources={"metadata": {"path": str(cwd)}})
    if fails:
        with pytest.raises(nbclient.exceptions.CellExecutionError):
            client.execute()
    else:
        client.execute()  # raises CellExecutionError (with the cell's traceback) on any failing cell
    return nb


def outputs(nb) -> list:
    return [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]


def printed(nb) -> tuple[str, int]:
    """(the printed text, the number of figures) of an executed notebook that ran without errors."""
    assert not [o for o in outputs(nb) if o.get("output_type") == "error"]
    figures = [o for o in outputs(nb) if "image/png" in o.get("data", {})]
    return "".join(o.get("text", "") for o in outputs(nb) if o.get("output_type") == "stream"), len(figures)


def error_line(nb) -> str:
    """The one error a failed run shows, checked to be one line (``Name: message``) and not a traceback."""
    errors = [o for o in outputs(nb) if o.get("output_type") == "error"]
    assert len(errors) == 1
    shown = ANSI.sub("", "".join(errors[0]["traceback"])).strip()
    assert "\n" not in shown and "Traceback" not in shown, shown
    assert shown == f"{errors[0]['ename']}: {errors[0]['evalue']}"
    return shown


@pytest.mark.parametrize("own_data", [False, True])
def test_data_notebook_executes(own_data, venv_kernel, project_with_fake_data, elsewhere):
    params = {"MY_DATA": "my data", "MY_NUM_CLASSES": 3} if own_data else {}
    text, figures = printed(run("01_data.ipynb", venv_kernel, elsewhere, **params))
    assert "8 samples, 4 classes" in text
    assert "ade20k: 2 val samples, 150 classes" in text and "cityscapes: 2 val samples, 19 classes" in text
    assert "pascal_context: not available" in text and "see data/README.md" in text
    if own_data:  # MY_DATA relative to the project root
        assert "folder: 2 train samples, 3 classes" in text
        assert figures == 5, "synthetic samples, augmentations, one figure per present real dataset, own data"
    else:
        assert "folder: MY_DATA is not set" in text
        assert figures == 4, "synthetic samples, augmentations, and one figure per present real dataset"


@pytest.mark.parametrize(("params", "expected"), [
    ({"MY_DATA": "no_such_folder", "MY_NUM_CLASSES": 3},
     "DataError: {project}/no_such_folder: dataset root not found; data=folder expects images/<split>/*"),
    ({"MY_DATA": "my data", "MY_NUM_CLASSES": 5},
     "SETRConfigError: data.num_classes: 5 but {project}/my data/classes.yaml lists 3 classes; "
     "set data.num_classes=3"),
    ({"MY_DATA": "my data"},
     "SETRConfigError: MY_NUM_CLASSES: not set (first code cell); set it to the number of classes listed in "
     "{project}/my data/classes.yaml"),
], ids=["missing_folder", "wrong_num_classes", "num_classes_not_set"])
def test_data_notebook_own_data_errors_are_one_line(params, expected, venv_kernel, project_with_fake_data,
                                                    elsewhere):
    nb = run("01_data.ipynb", venv_kernel, elsewhere, fails=True, last_cells=1, **params)  # the own-data cell
    assert "MY_DATA" in nb.cells[-1].source
    assert error_line(nb).startswith(expected.format(project=project_with_fake_data))


# an ADE20K-like keep-ratio test resize (2048x512 scaled down by 8) on the tiny models
RESCALE = [{"_target_": "setr.data.transforms.RandomRescale", "img_scale": [256, 64], "ratio_range": None}]


@pytest.mark.parametrize("head", ["mla", "pup"])
def test_predict_notebook_executes(head, venv_kernel, tmp_path, elsewhere, monkeypatch):
    """MLA (CKPT absolute): the cls token is dropped before the blocks; with a test-time resize, as src/predict.py
    applies it. PUP (CKPT relative to the project root) keeps the cls token; no test resize: photos at their own
    size."""
    project = tmp_path / "project"
    monkeypatch.setenv("PROJECT_ROOT", str(project))
    ckpt = write_tiny_checkpoint(project / "logs" / f"{head}.ckpt", head=head,
                                 test_pipeline=RESCALE if head == "mla" else None)
    setting = str(ckpt) if head == "mla" else "logs/pup.ckpt"
    text, figures = printed(run("02_predict.ipynb", venv_kernel, elsewhere, CKPT=setting))
    assert f"checkpoint: {ckpt}\n" in text
    assert "4 classes: background, disc, rectangle, triangle" in text
    if head == "mla":
        # keep ratio into 256x64: factor min(256 / long, 64 / short)
        inputs = {"astronaut": ("512x512", "64x64"), "coffee": ("600x400", "96x64"), "camera": ("512x512", "64x64")}
        # the 512x512 photo runs at 64x64: pixel (130, 220) -> (16, 27) -> patch (1, 1) of 4x4
        assert "-> model input (y=16, x=27) of 64x64 -> patch row 1, col 1 of the 4x4 grid" in text
        assert "-> token 5 (0 prefix token(s) before the patches)" in text  # row 1 * 4 columns + col 1
    else:
        assert "test-time resize none (photos run at their own size)" in text
        inputs = {"astronaut": ("512x512", "512x512"), "coffee": ("600x400", "600x400"),
                  "camera": ("512x512", "512x512")}
        # at 512x512: pixel (130, 220) -> patch (8, 13) of 32x32 -> token 1 + 8 * 32 + 13
        assert "-> model input (y=130, x=220) of 512x512 -> patch row 8, col 13 of the 32x32 grid" in text
        assert "-> token 270 (1 prefix token(s) before the patches)" in text
    for name, (photo, model_input) in inputs.items():
        assert f"{name}: photo {photo}, model input {model_input};" in text
    assert figures == 2, "predictions, attention map"


@pytest.mark.parametrize("case", ["not_set", "not_set_with_a_run", "not_found"])
def test_predict_notebook_without_checkpoint_stops_with_one_line(case, venv_kernel, tmp_path, elsewhere,
                                                                 monkeypatch):
    """No checkpoint named: one line that says how to get one; a run under logs/ is named in it, never loaded."""
    project = tmp_path / "project"
    monkeypatch.setenv("PROJECT_ROOT", str(project))
    params = {"CKPT": "logs/nothing_here.ckpt"} if case == "not_found" else {}
    if case == "not_set_with_a_run":
        write_tiny_checkpoint(project / "logs" / "train" / "runs" / "2026-01-31_12-00-00" / "checkpoints"
                              / "last.ckpt")
    nb = run("02_predict.ipynb", venv_kernel, elsewhere, fails=True, **params)
    line = error_line(nb)
    assert line.startswith("SETRConfigError: CKPT: ")
    assert not any("checkpoint: " in o.get("text", "") for o in outputs(nb)), "nothing was loaded"
    if case == "not_found":
        assert f"CKPT: {project}/logs/nothing_here.ckpt not found; `make train` writes" in line
    elif case == "not_set":
        assert "CKPT: not set;" in line and "`make train` writes one" in line
    else:
        assert 'CKPT = "logs/train/runs/2026-01-31_12-00-00/checkpoints/last.ckpt"' in line
