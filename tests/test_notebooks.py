"""Every notebook in notebooks/ runs top to bottom (small settings: ATTNLAB_SMALL=1)."""

from __future__ import annotations

import os
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted((Path(__file__).parent.parent / "notebooks").glob("*.ipynb"))


def test_there_are_notebooks():
    assert NOTEBOOKS, "notebooks/ should hold the tutorial notebooks"


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path, tmp_path, monkeypatch):
    monkeypatch.setenv("ATTNLAB_SMALL", "1")
    monkeypatch.setenv("ATTNLAB_RUNS", str(tmp_path / "runs"))
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}})
    client.execute()
    errors = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors
    # every notebook ends by showing something: its last code cell has output
    last = [c for c in nb.cells if c.cell_type == "code"][-1]
    assert last.get("outputs"), f"{path.name}: the last cell shows nothing"
    assert os.environ.get("ATTNLAB_SMALL") == "1"
