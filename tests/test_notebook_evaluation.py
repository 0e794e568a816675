"""notebooks/04_evaluation.ipynb runs top to bottom against a tiny run made by the real pipeline
(prepare -> tokenizer -> tokenize -> train -> eval), so its outputs are real and it never rots."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_eval import stdlib_docs

from antimatter.config import load_config
from antimatter.pipeline import run_pipeline

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "04_evaluation.ipynb"


def build_pipeline_run(root: Path) -> Path:
    corpus = root / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in stdlib_docs()))
    cfg = load_config(None, [
        "model=tiny", "name=nb", f"runs_dir={root / 'runs'}", f"data.sources=[{{path: {corpus}}}]",
        "data.val_fraction=0.1", "data.dedup.near=false", "tokenizer.vocab_size=400",
        "train.device=cpu", "train.micro_batch_size=16", "train.max_steps=120", "train.lr=3e-3",
        "train.warmup_steps=10", "train.eval_interval=40", "train.log_interval=5", "train.ckpt_interval=60",
        "train.tensorboard=false", "eval.max_eval_tokens=4000", "eval.continuation_docs=4", "eval.prefix_tokens=16",
        "eval.continuation_tokens=16", "eval.speed_new_tokens=8", "eval.speed_batch=4",
        "eval.sample.max_new_tokens=24"])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny model on shared cores: one thread is fastest
    try:
        run_pipeline(cfg)
    finally:
        torch.set_num_threads(threads)
    return cfg.run_dir


def test_notebook_executes_on_a_tiny_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    run = build_pipeline_run(tmp_path)
    ev = json.loads((run / "results/evaluations/final_evaluation.json").read_text())
    assert ev["val"]["perplexity"] < ev["val"]["unigram_perplexity"]  # the model learned beyond frequencies

    monkeypatch.setenv("ANTIMATTER_RUN", str(run))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbclient.NotebookClient(nb, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
                            ).execute()
    text = "\n".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert f"{ev['val']['perplexity']:.2f}" in text and "unigram perplexity" in text
    assert "BLEU" in text and "The future of artificial intelligence" in text and "decode" in text
    assert "loss at position 1" in text and ev["provenance"]["git_commit"] in text
    images = [o for c in nb.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert len(images) == 2
