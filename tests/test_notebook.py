"""notebooks/sampling.ipynb runs top to bottom against a tiny trained checkpoint."""

import os
import time

import nbclient
import nbformat
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(REPO, "notebooks", "sampling.ipynb")
# One inline video per mode: t2v, the ground-truth clip, i2v, extend, extend_backward,
# interpolate, loop, edit, draft + refine.
NUM_VIDEO_CELLS = 9


@pytest.fixture(scope="module")
def tiny_run(tiny_conditioned_run):
  return tiny_conditioned_run  # conftest.py: trained once per session, shared.


@pytest.mark.slow
def test_sampling_notebook_runs_top_to_bottom_and_shows_every_mode(tiny_run, monkeypatch):
  monkeypatch.setenv("SPACETIME_DIT_WORKDIR", tiny_run)
  monkeypatch.setenv("SPACETIME_DIT_STEPS", "1")
  # The kernel is a fresh process started in notebooks/: import this checkout whatever is installed.
  monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")])))
  notebook = nbformat.read(NOTEBOOK, as_version=4)
  client = nbclient.NotebookClient(
      notebook, timeout=300, kernel_name="python3",
      resources={"metadata": {"path": os.path.join(REPO, "notebooks")}},
  )
  start = time.perf_counter()
  client.execute()  # Raises CellExecutionError, with the cell and its traceback, on any error.
  elapsed = time.perf_counter() - start
  shown = [
      cell for cell in notebook.cells if cell.cell_type == "code"
      and any("<video" in out.get("data", {}).get("text/html", "") for out in cell.outputs)
  ]
  assert len(shown) == NUM_VIDEO_CELLS
  assert elapsed < 90, f"the notebook took {elapsed:.0f} s on the tiny model; keep it under 90 s"
