"""notebooks/03_tokenization.ipynb runs top to bottom against a tiny real run, so it never rots."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import zstandard

from antimatter.config import load_config
from antimatter.tokenizer import train_tokenizer
from antimatter.tokens import run_tokenize

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "03_tokenization.ipynb"

PROSE = "It was a bright cold day in April, and the clocks were striking thirteen. "
CODE = "def area(r: float) -> float:\n    return 3.14159 * r * r\n\n"
DICT = "lexicon (n.): the vocabulary of a language; a dictionary. See also: glossary.\n"


def write_split(folder: Path, records: list[dict]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    body = "".join(json.dumps(r) + "\n" for r in records)
    (folder / "00000.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(body.encode()))


def test_notebook_executes_on_a_tiny_run(tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    run = tmp_path / "run"
    for split, n in (("train", 60), ("val", 12)):
        records = [{"id": f"{src}/{split}{i}", "source": src, "text": f"{text * (1 + i % 4)}[{i}]"}
                   for i in range(n) for src, text in (("prose", PROSE), ("code", CODE), ("dict", DICT))]
        write_split(run / "data" / split, records)
    cfg = load_config(None, ["model=tiny"])
    train_tokenizer(cfg, run / "data", run / "tokenizer")
    run_tokenize(cfg, run / "data", run / "tokenizer", run / "tokens")

    monkeypatch.setenv("ANTIMATTER_RUN", str(run))
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbclient.NotebookClient(nb, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
                            ).execute()
    text = "\n".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "vocab size" in text and "round-tripped exactly: 2000/2000" in text
    for source in ("prose", "code", "dict"):
        assert source in text
    assert any("image/png" in o.get("data", {}) for c in nb.cells for o in c.get("outputs", []))
