"""Execute the data notebooks (01 exploration, 02 preprocessing) on a small corpus so they never rot."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from antimatter.data.sample import write_sample_corpus

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"


@pytest.mark.parametrize("name", ["01_data_exploration.ipynb", "02_preprocessing.ipynb"])
def test_data_notebook_runs(name, tmp_path, monkeypatch):
    corpus = write_sample_corpus(tmp_path / "corpus")
    monkeypatch.setenv("ANTIMATTER_NOTEBOOK_DATA", ":".join(
        str(corpus / p) for p in ("books", "web-00000.jsonl.zst", "code")))
    monkeypatch.setenv("ANTIMATTER_NOTEBOOK_OUT", str(tmp_path / "out"))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    NotebookClient(nb, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "Traceback" not in outputs
    if name.startswith("02"):
        assert "removed by dedup.near" in outputs and (tmp_path / "out" / "dataset_statistics.json").is_file()
    else:
        assert "documents" in outputs and "books" in outputs
