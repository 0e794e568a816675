"""Shared set-up for the training tests: a run folder with real token shards (written by tokens.py's
writer) holding a small learnable stream, and a tiny config."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from antimatter.config import RunConfig, config_from_dict, save_config
from antimatter.tokenizer import EOT_ID
from antimatter.tokens import write_shard

VOCAB = 512


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: on 2 shared cores torch's default of 2 threads runs these tiny models up to 20x
    slower (the threads spin waiting for each other). Subprocesses get OMP_NUM_THREADS=1 from cli_env."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def make_tokens(run_dir: Path, n_train: int = 40_000, n_val: int = 4_000, seed: int = 0) -> Path:
    """`run_dir/tokens/{train,val}/00000.bin` + meta.json: documents of a noisy counting pattern."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("val", n_val)):
        docs = []
        total = 0
        while total < n:
            start, step = int(rng.integers(1, VOCAB)), int(rng.integers(1, 7))
            length = int(rng.integers(20, 200))
            doc = (start + step * np.arange(length)) % (VOCAB - 1) + 1
            noise = rng.random(length) < 0.05
            doc[noise] = rng.integers(1, VOCAB, noise.sum())
            docs.append(np.append(doc, EOT_ID))
            total += length + 1
        tokens = np.concatenate(docs)[:n].astype(np.uint16)
        out = run_dir / "tokens" / split
        out.mkdir(parents=True, exist_ok=True)
        write_shard(out / "00000.bin", tokens, VOCAB, EOT_ID)
    (run_dir / "tokens" / "meta.json").write_text(json.dumps({"vocab_size": VOCAB, "eot_id": EOT_ID}))
    return run_dir


def tiny_config(run_dir: Path, recipe: str = "gpt2", **train) -> RunConfig:
    """The `tiny` preset on the CPU, fp32, small batches; `train` overrides TrainConfig fields. GPT-2's recipe
    unless told (AdamW: what most loop, resume and fault tests were written against)."""
    base = dict(device="cpu", dtype="fp32", micro_batch_size=4, seq_len=32, max_steps=8, warmup_steps=2,
                lr=3e-3, eval_interval=4, eval_steps=2, log_interval=1, ckpt_interval=4, tensorboard=False,
                keep_last=2)
    base.update(train)
    return config_from_dict({"recipe": recipe, "name": run_dir.name, "runs_dir": str(run_dir.parent),
                             "model": "tiny", "train": base})


def write_config(run_dir: Path, cfg: RunConfig) -> Path:
    path = run_dir / "test_config.yaml"
    save_config(cfg, path)
    return path


def cli_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return env


def cli_train(cfg_path: Path, *extra: str, nproc: int = 0, nnodes: int = 0, node_rank: int = 0,
              port: int = 0, popen: bool = False, env: dict[str, str] | None = None):
    """`antimatter train` in a subprocess: plain python, or torchrun with nproc processes."""
    cmd = [sys.executable]
    if nproc:
        cmd += ["-m", "torch.distributed.run", f"--nproc-per-node={nproc}"]
        if nnodes:
            cmd += [f"--nnodes={nnodes}", f"--node-rank={node_rank}", "--rdzv-backend=c10d",
                    f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=amtest"]
        else:
            cmd += ["--standalone"]
    cmd += ["-m", "antimatter.cli", "train", "--config", str(cfg_path), *extra]
    kw = dict(env=env or cli_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if popen:
        return subprocess.Popen(cmd, **kw)
    return subprocess.run(cmd, timeout=120, **kw)


def losses(run_dir: Path) -> dict[int, float]:
    """step -> training loss from logs/metrics.jsonl (the last entry per step wins)."""
    out = {}
    for line in (run_dir / "logs" / "metrics.jsonl").read_text().splitlines():
        m = json.loads(line)
        if "loss" in m:
            out[m["step"]] = m["loss"]
    return out


def single_process_run(run_dir: Path, **settings) -> Path:
    """The one-process reference the distributed tests compare with: a run at global batch 256 tokens, so
    one process accumulates 2 micro-batches where two processes take one each."""
    from antimatter.train.trainer import train

    run = make_tokens(run_dir)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        summary = train(tiny_config(run, **settings), run)
    finally:
        torch.set_num_threads(n)
    assert summary["accum_steps"] == 2
    return run
