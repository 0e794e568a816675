"""`antimatter info`: what a model config costs before you train it (parameters, FLOPs, memory, time)."""

from __future__ import annotations

import math
from typing import Any

from rich.console import Console
from rich.table import Table

from antimatter.config import ModelConfig, RunConfig
from antimatter.errors import UserError
from antimatter.model.sizing import GPUS, flops_per_token, gpu_spec, memory_estimate, param_counts

ASSUMED_MFU = 0.5  # for time estimates only; docs/RESULTS.md has the MFU measured on an H100


def print_info(cfg: RunConfig, gpu: str | None = None, micro_batch: int | None = None,
               tokens: float | None = None) -> dict:
    """Print the model's size, its training memory by micro-batch and (with a GPU) its speed; returns them."""
    if micro_batch is not None and micro_batch <= 0:  # a negative batch prints negative memory
        raise UserError(f"--micro-batch must be positive, got {micro_batch}: it is the sequences per step")
    if tokens is not None and not 0 < tokens < math.inf:
        raise UserError(f"--tokens must be a positive number, got {tokens:g}: the tokens to train on (e.g. 1e9)")
    spec = None
    if gpu:
        spec = gpu_spec(gpu)
        if spec is None:
            raise UserError(f"unknown GPU '{gpu}': choose one of {', '.join(GPUS)}")
    m, T = cfg.model, cfg.seq_len
    c = param_counts(m)
    fpt = flops_per_token(m, T)
    console = Console()
    console.print(_size_table(m, c, T, fpt))
    dtype = "bf16" if spec is None or "bf16" in spec.tflops else "fp16"
    table, rows = _memory_table(m, T, dtype, spec, micro_batch)
    console.print(table)
    out = {"params": c, "flops_per_token": fpt, "memory": rows}
    if spec:
        line, speed = _speed(spec, dtype, fpt, tokens)
        out.update(speed)
        console.print(line)
    return out


def _size_table(m: ModelConfig, c: dict, T: int, fpt: float) -> Table:
    title = f"model {m.preset or '(custom)'}: {m.arch}, {m.n_layer} layers, d_model {m.d_model}, " \
            f"{m.n_head} heads, vocab {m.vocab_size:,}, context {m.block_size:,}"
    t = Table(title=title, show_header=False)
    t.add_row("parameters (total)", f"{c['total']:,}")
    t.add_row("  non-embedding", f"{c['non_embedding']:,}")
    parts = ["token"] + (["position"] if c["wpe"] else []) + (["untied head"] if c["lm_head_untied"] else [])
    t.add_row(f"  embedding ({' + '.join(parts)})",
              f"{c['embedding']:,}")
    t.add_row("tied input/output embeddings", "yes" if m.tie_embeddings else "no")
    t.add_row(f"training FLOPs per token (seq {T})", f"{fpt / 1e9:.3f} GFLOP  (6N + 12·L·d·T)")
    t.add_row("inference FLOPs per token", f"{fpt / 3e9:.3f} GFLOP")
    for name, nbytes in (("fp32", 4), ("fp16/bf16", 2)):
        t.add_row(f"weights in {name}", f"{c['total'] * nbytes / 1e9:.3f} GB ({c['total'] * nbytes / 2**30:.3f} GiB)")
    t.add_row("weights + grads + AdamW state (fp32)", f"{16 * c['total'] / 2**30:.2f} GiB")
    return t


def _memory_table(m: ModelConfig, T: int, dtype: str, spec: Any, micro_batch: int | None) -> tuple[Table, list]:
    mem = Table(title=f"training memory estimate at seq {T} ({dtype} autocast, flash attention)")
    for col in ("micro-batch", "states GiB", "activations GiB", "total GiB"):
        mem.add_column(col, justify="right")
    if spec:
        mem.add_column(f"fits {spec.name} ({spec.memory_gb:g} GB)", justify="right")
    sizes = [micro_batch] if micro_batch else [1, 2, 4, 8, 16, 32, 64]
    rows = []
    for b in sizes:
        est = memory_estimate(m, b, T, dtype=dtype)
        rows.append({"micro_batch": b, **est})
        cells = [str(b), f"{est['weights_grads_optimizer_gib']:.1f}", f"{est['activations_gib']:.1f}",
                 f"{est['total_gib']:.1f}"]
        if spec:
            cells.append("yes" if est["total_gib"] * 2**30 < 0.92 * spec.memory_gb * 1e9 else "no")
        mem.add_row(*cells)
    return mem, rows


def _speed(spec: Any, dtype: str, fpt: float, tokens: float | None) -> tuple[str, dict]:
    """The line on tokens/s at the assumed MFU (and the hours for `tokens`), and those figures."""
    peak = spec.tflops.get(dtype, 0) * 1e12
    tps = ASSUMED_MFU * peak / fpt
    out = {"tokens_per_s_at_assumed_mfu": tps}
    line = f"{spec.name}: {dtype} peak {peak / 1e12:g} TFLOP/s -> ~{tps:,.0f} tokens/s at {ASSUMED_MFU:.0%} MFU"
    if tokens:
        hours = tokens / tps / 3600
        out["hours"] = hours
        line += f"; {tokens:,.0f} tokens in ~{hours:.1f} h"
    return line, out
