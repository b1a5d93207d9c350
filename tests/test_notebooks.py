"""The notebooks run headless from a clean kernel and are stored without outputs."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

import fake_datasets as fake
from conftest import write_tiny_checkpoint

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ["01_data.ipynb", "02_predict.ipynb"]


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
def project_with_fake_data(tmp_path, monkeypatch) -> Path:
    """PROJECT_ROOT (hence paths.data_dir) pointing at fake ADE20K and Cityscapes trees; Pascal Context absent,
    so the notebook's real-data section runs both its branches."""
    project = tmp_path / "project"
    fake.make_ade20k(project / "data" / "ade20k", n_train=1, n_val=2)
    fake.make_cityscapes(project / "data" / "cityscapes", n_train=1, n_val=2)
    monkeypatch.setenv("PROJECT_ROOT", str(project))
    return project


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_is_stored_without_outputs(name):
    nb = nbformat.read(ROOT / "notebooks" / name, as_version=4)
    nbformat.validate(nb)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, f"{name}: clear the outputs before committing"


def execute(name: str, kernel: str) -> tuple[str, int]:
    """Run notebooks/<name> from a clean kernel; returns (its printed text, its number of figures)."""
    nb = nbformat.read(ROOT / "notebooks" / name, as_version=4)
    client = nbclient.NotebookClient(nb, kernel_name=kernel, timeout=600, startup_timeout=600,
                                     resources={"metadata": {"path": str(ROOT / "notebooks")}})
    client.execute()  # raises CellExecutionError (with the cell's traceback) on any failing cell
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    figures = [o for o in outputs if "image/png" in o.get("data", {})]
    text = "".join(o.get("text", "") for o in outputs if o.get("output_type") == "stream")
    return text, len(figures)


def test_data_notebook_executes(venv_kernel, project_with_fake_data):
    text, figures = execute("01_data.ipynb", venv_kernel)
    assert "8 samples, 4 classes" in text
    assert "ade20k: 2 val samples, 150 classes" in text and "cityscapes: 2 val samples, 19 classes" in text
    assert "pascal_context: not available" in text and "see data/README.md" in text
    assert figures == 4, "synthetic samples, augmentations, and one figure per present real dataset"


# an ADE20K-like keep-ratio test resize (2048x512 scaled down by 8) on the tiny models
RESCALE = [{"_target_": "setr.data.transforms.RandomRescale", "img_scale": [256, 64], "ratio_range": None}]


@pytest.mark.parametrize("source", ["SETR_CKPT", "fresh"])
def test_predict_notebook_executes(source, venv_kernel, tmp_path, monkeypatch):
    """With SETR_CKPT (an MLA checkpoint: the cls token is dropped before the blocks; with a test-time resize, as
    src/predict.py applies it) and with no checkpoint anywhere (PROJECT_ROOT without logs/: a freshly initialised
    tiny SETR-PUP, which keeps the cls token; the synthetic data has no test resize: photos at their own size)."""
    monkeypatch.setenv("PROJECT_ROOT", str(tmp_path / "empty_project"))
    if source == "SETR_CKPT":
        ckpt = write_tiny_checkpoint(tmp_path / "mla.ckpt", head="mla", test_pipeline=RESCALE)
        monkeypatch.setenv("SETR_CKPT", str(ckpt))
    else:
        monkeypatch.delenv("SETR_CKPT", raising=False)
    text, figures = execute("02_predict.ipynb", venv_kernel)
    assert "4 classes: background, disc, rectangle, triangle" in text
    if source == "SETR_CKPT":
        assert f"checkpoint: {ckpt} (from SETR_CKPT)" in text and "MEANINGLESS" not in text
        # keep ratio into 256x64: factor min(256 / long, 64 / short)
        inputs = {"astronaut": ("512x512", "64x64"), "coffee": ("600x400", "96x64"), "camera": ("512x512", "64x64")}
        # the 512x512 photo runs at 64x64: pixel (130, 220) -> (16, 27) -> patch (1, 1) of 4x4
        assert "-> model input (y=16, x=27) of 64x64 -> patch row 1, col 1 of the 4x4 grid" in text
        assert "-> token 5 (0 prefix token(s) before the patches)" in text  # row 1 * 4 columns + col 1
    else:
        assert "no checkpoint" in text and "MEANINGLESS" in text
        assert "test-time resize none (photos run at their own size)" in text
        inputs = {"astronaut": ("512x512", "512x512"), "coffee": ("600x400", "600x400"),
                  "camera": ("512x512", "512x512")}
        # at 512x512: pixel (130, 220) -> patch (8, 13) of 32x32 -> token 1 + 8 * 32 + 13
        assert "-> model input (y=130, x=220) of 512x512 -> patch row 8, col 13 of the 32x32 grid" in text
        assert "-> token 270 (1 prefix token(s) before the patches)" in text
    for name, (photo, model_input) in inputs.items():
        assert f"{name}: photo {photo}, model input {model_input};" in text
    assert figures == 2, "predictions, attention map"
