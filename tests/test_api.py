"""What `import antimatter` offers: a cheap import (no torch until a name needs it), `run_pipeline` from a dict,
a YAML file or a config object (the run folder, each stage's summary, the evaluation), and `antimatter
pipeline` through the same call; bad input as one line."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_cli import cli
from test_pipeline import write_corpus

import antimatter
from antimatter.config import ConfigError, save_config
from antimatter.pipeline import STAGE_ORDER


def tiny_pipeline_config(root: Path, corpus: Path) -> dict:
    """The tiny model on a small corpus, 4 steps on the CPU: the sections of a YAML file, as a dict."""
    return {"name": "api", "runs_dir": str(root / "runs"), "model": "tiny",
            "data": {"sources": [{"path": str(corpus)}], "val_fraction": 0.2, "workers": 1},
            "tokenizer": {"vocab_size": 300}, "tokenize": {"workers": 1},
            "train": {"device": "cpu", "dtype": "fp32", "seq_len": 32, "micro_batch_size": 4, "warmup_steps": 1,
                      "eval_interval": 2, "eval_steps": 1, "ckpt_interval": 2, "tensorboard": False},
            "eval": {"device": "cpu", "max_eval_tokens": 256, "batch_size": 4, "continuation_docs": 2,
                     "prefix_tokens": 8, "continuation_tokens": 8, "speed": False, "plots": False,
                     "sample": {"max_new_tokens": 8}}}


def test_import_antimatter_is_cheap_and_names_its_api():
    code = ("import sys, antimatter; print('torch' in sys.modules, 'antimatter.llm' in sys.modules); "
            "antimatter.load_config; print('torch' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                       env={**os.environ, "PYTHONPATH": str(Path(antimatter.__file__).parents[1])})
    assert r.returncode == 0 and r.stdout.split() == ["False", "False", "False"], r.stderr
    assert {"LLM", "run_pipeline", "load_config", "PipelineRun"} <= set(dir(antimatter))
    with pytest.raises(AttributeError, match="module 'antimatter' has no attribute 'generate'"):
        antimatter.generate  # noqa: B018


def test_run_pipeline_from_a_dict_a_file_and_a_config(tmp_path):
    """A dict with dotted overrides on top runs every stage; the same config as a YAML file, or as the config
    object, finds every stage current and returns the same run; the run's model answers through `.llm()`."""
    corpus = write_corpus(tmp_path / "corpus")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run = antimatter.run_pipeline(tiny_pipeline_config(tmp_path, corpus), ["train.max_steps=4"])
    finally:
        torch.set_num_threads(threads)
    assert run.run_dir == tmp_path / "runs" / "api" and tuple(run.stages) == STAGE_ORDER
    assert run.stages["train"]["steps"] == 4 and run.evaluation["val"]["perplexity"] > 1
    cfg = antimatter.load_config(tiny_pipeline_config(tmp_path, corpus), ["train.max_steps=4"])
    save_config(cfg, tmp_path / "api.yaml")
    again = antimatter.run_pipeline(tmp_path / "api.yaml")
    assert again.run_dir == run.run_dir and again.evaluation == run.evaluation
    assert antimatter.run_pipeline(cfg, stages=("eval",)).evaluation == run.evaluation
    llm = run.llm(device="cpu")
    assert isinstance(llm.generate("The cat", max_new_tokens=4, seed=1), str)
    # the command line's pipeline is the same call: everything current, nothing redone
    r = cli("pipeline", "--config", str(tmp_path / "api.yaml"), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "[eval] up to date" in r.stderr + r.stdout and "[prepare] up to date" in r.stderr + r.stdout


def test_bad_pipeline_input_is_one_line(tmp_path):
    with pytest.raises(ConfigError, match=r"^unknown config key 'train.lrr': did you mean 'train.lr'\?$"):
        antimatter.run_pipeline({"train": {"lrr": 1}})
    with pytest.raises(ConfigError, match=r"^config file not found: .*missing.yaml"):
        antimatter.run_pipeline(tmp_path / "missing.yaml")
    cfg = antimatter.load_config(None, ["model=tiny"])
    with pytest.raises(ValueError, match=r"^overrides apply to a YAML path or a dict; set the fields of a RunConfig "
                                         r"directly$"):
        antimatter.run_pipeline(cfg, ["train.lr=1"])
    cfg.train.lr = -1.0  # edited by hand: checked again before anything runs
    with pytest.raises(ConfigError, match=r"^train.lr must be positive, got -1.0$"):
        antimatter.run_pipeline(cfg)
