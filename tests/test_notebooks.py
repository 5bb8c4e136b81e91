"""Executes the notebooks in notebooks/ top to bottom, with small settings, in a fresh kernel.

Each notebook checks its own key numbers in `assert` cells (EVON's KL to the exact logistic
posterior, NUTS against the quadrature optimum, identical continuation after an orbax restore,
...), so a regression anywhere in the library surfaces here as a failing cell. The kernel is
this interpreter (`sys.executable`, through a kernel spec written to a temporary directory,
not whatever `python3` kernel Jupyter would find), with `EVON_NOTEBOOK_SMALL=1` (the
notebooks shrink their settings), the suite's strict rank promotion, and every warning shown:
anything a notebook prints to stderr fails the test.

The committed notebooks carry the outputs of a full-size run; regenerate them with nbclient's
`jupyter execute --inplace notebooks/*.ipynb` (without `EVON_NOTEBOOK_SMALL`).
"""

from __future__ import annotations

import json
import pathlib
import sys

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOK_DIR = pathlib.Path(__file__).resolve().parent.parent / "notebooks"
NOTEBOOKS = sorted(path.name for path in NOTEBOOK_DIR.glob("*.ipynb"))
CELL_TIMEOUT_S = 300
MAX_NOTEBOOK_BYTES = 300_000  # committed outputs stay small: a few low-dpi images
KERNEL_NAME = "evon-notebook-test"


def _install_kernel_spec(tmp_path: pathlib.Path, monkeypatch) -> None:
  """A kernel spec for this interpreter, found first through JUPYTER_PATH."""
  spec_dir = tmp_path / "jupyter" / "kernels" / KERNEL_NAME
  spec_dir.mkdir(parents=True)
  (spec_dir / "kernel.json").write_text(json.dumps({
      "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
      "display_name": "evon_jax test kernel",
      "language": "python",
      # Show every warning once (library deprecations included): any stderr output fails.
      "env": {"EVON_NOTEBOOK_SMALL": "1", "JAX_NUMPY_RANK_PROMOTION": "raise",
              "PYTHONWARNINGS": "default"},
  }))
  monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))


def _outputs(nb, output_type: str):
  return [out for cell in nb.cells if cell.cell_type == "code"
          for out in cell.get("outputs", []) if out.get("output_type") == output_type]


def test_notebooks_found():
  assert {"01_logistic_regression.ipynb", "02_toy_2d_uncertainty.ipynb",
          "03_nnx_training_loop.ipynb", "04_results.ipynb"} <= set(NOTEBOOKS), NOTEBOOKS


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_committed_notebook_is_small_and_clean(name):
  """The committed outputs come from a successful run and stay small."""
  path = NOTEBOOK_DIR / name
  assert path.stat().st_size < MAX_NOTEBOOK_BYTES, path.stat().st_size
  nb = nbformat.read(path, as_version=4)
  nbformat.validate(nb)
  assert not _outputs(nb, "error")
  assert not [out for out in _outputs(nb, "stream") if out["name"] == "stderr"]
  code_cells = [cell for cell in nb.cells if cell.cell_type == "code"]
  assert all(cell.execution_count is not None for cell in code_cells), "not fully executed"


# 01 (37-45 s) and 04 (a few seconds) run in the default suite; 02 and 03 (55-66 s each)
# are slow.
QUICK_NOTEBOOKS = {"01_logistic_regression.ipynb", "04_results.ipynb"}


@pytest.mark.parametrize("name", [n if n in QUICK_NOTEBOOKS else
                                  pytest.param(n, marks=pytest.mark.slow) for n in NOTEBOOKS])
def test_notebook_executes(name, tmp_path, monkeypatch):
  _install_kernel_spec(tmp_path, monkeypatch)
  nb = nbformat.read(NOTEBOOK_DIR / name, as_version=4)
  client = NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name=KERNEL_NAME,
                          resources={"metadata": {"path": str(NOTEBOOK_DIR)}})
  client.execute()  # raises CellExecutionError at the first failing cell (asserts included)
  assert not _outputs(nb, "error")
  stderr = "".join(out["text"] for out in _outputs(nb, "stream") if out["name"] == "stderr")
  assert not stderr.strip(), stderr  # warnings printed in the kernel count as failures
  assert "small mode: True" in "".join(
      out["text"] for out in _outputs(nb, "stream") if out["name"] == "stdout")
