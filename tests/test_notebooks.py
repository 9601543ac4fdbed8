"""The notebooks in ``notebooks/`` run top to bottom on the tiny random model.

Each notebook is executed with nbclient in a fresh ``python3`` kernel started from the
interpreter running pytest (a kernelspec written to a temporary directory, so the kernel sees
the same packages whatever kernels are installed on the machine), with
``RLLAMA_NOTEBOOK_MODEL=tiny``. A cell that raises fails the test with its traceback; the
notebooks' own ``assert`` cells (e.g. the custom loss raising the return) count as well.
"""

from __future__ import annotations

import json
import pathlib
import sys

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

from jupyter_client.kernelspec import KernelSpecManager  # noqa: E402
from jupyter_client.manager import KernelManager  # noqa: E402

NOTEBOOK_DIR = pathlib.Path(__file__).resolve().parents[1] / "notebooks"
NOTEBOOKS = ["01_quickstart.ipynb", "02_custom_loss.ipynb", "03_memory.ipynb"]
KERNEL = "python3"


@pytest.fixture(scope="module")
def kernel_dir(tmp_path_factory) -> pathlib.Path:
    """A kernelspec directory whose ``python3`` kernel is this interpreter."""
    root = tmp_path_factory.mktemp("kernels")
    spec = root / KERNEL
    spec.mkdir()
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    spec_json = {"argv": argv, "display_name": "Python 3 (pytest)", "language": "python"}
    (spec / "kernel.json").write_text(json.dumps(spec_json), encoding="utf-8")
    return root


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_has_no_stored_outputs(name):
    nb = nbformat.read(NOTEBOOK_DIR / name, as_version=4)
    nbformat.validate(nb)
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            assert not cell.outputs and cell.execution_count is None, f"{name}: cell {i}"


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs(name, kernel_dir, monkeypatch):
    monkeypatch.setenv("RLLAMA_NOTEBOOK_MODEL", "tiny")  # the kernel inherits os.environ
    nb = nbformat.read(NOTEBOOK_DIR / name, as_version=4)
    specs = KernelSpecManager(kernel_dirs=[str(kernel_dir)], ensure_native_kernel=False)
    km = KernelManager(kernel_name=KERNEL, kernel_spec_manager=specs)
    client = nbclient.NotebookClient(
        nb,
        km=km,
        kernel_name=KERNEL,
        timeout=600,
        resources={"metadata": {"path": str(NOTEBOOK_DIR)}},  # the kernel's working directory
    )
    client.execute()  # raises CellExecutionError (with the cell's traceback) on any error
