"""Inference speed: prefill and decode throughput, time to first token, peak memory, on a named device.

Measured with the project's own `generate` (static KV cache), on random prompts (speed does not depend on
the text) with no end-of-text stop, so every row produces exactly the requested tokens:
  * prefill tokens/s: one forward pass over (batch, prompt) tokens, the work a prompt costs;
  * time to first token: `generate(..., max_new_tokens=1)` at batch 1 (cache set-up + prefill + sample);
  * decode tokens/s at batch b: b * (n - 1) / (t(n new tokens) - t(1 new token)), i.e. the steady
    one-token-at-a-time rate with the prefill subtracted.
Each figure is the median of `repeats` timed runs after one warm-up run. On a GPU the model is timed as it
would be served, as a bf16 copy of its weights (fp16 where bf16 is missing); eager by default, and with
`compile` also with the compiled decode step (CUDA graphs).
"""

from __future__ import annotations

import copy
import resource
import statistics
import time

import torch

from antimatter.device import DTYPES, resolve_dtype
from antimatter.model.generate import generate
from antimatter.provenance import device_name


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device: torch.device, repeats: int) -> float:
    fn()  # warm-up (allocations, kernel selection)
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _inference_copy(model, device: torch.device, dtype: str):
    """The model as it would be served: a copy of the weights in the resolved dtype (auto: bf16, or fp16,
    on a GPU; fp32 elsewhere), so no per-op autocast casts are timed. Returns (model, dtype name)."""
    name = resolve_dtype(dtype, device, "eval.dtype")
    if name == "fp32":
        return model, "fp32"
    target = DTYPES[name]
    if model.lm_head.weight.dtype == target:  # already served as such (e.g. an int8 copy made from bf16)
        return model, name
    return copy.deepcopy(model).to(target).eval(), name


@torch.inference_mode()
def measure_speed(model, *, prompt_tokens: int = 0, new_tokens: int = 32, batch_sizes: tuple[int, ...] = (1, 8),
                  repeats: int = 3, dtype: str = "auto", seed: int = 0, compile: bool = False) -> dict:
    """Prefill and decode throughput of `model` on its current device (see the module docstring). With
    `compile`, decode is also timed with `generate(compile=True)` (CUDA graphs), after its compilation."""
    device = next(model.parameters()).device
    model, dtype_name = _inference_copy(model, device, dtype)
    ctx_len = model.cfg.block_size
    new_tokens = max(2, min(new_tokens, ctx_len // 2))
    P = min(prompt_tokens or ctx_len // 2, ctx_len - new_tokens)
    gen = torch.Generator().manual_seed(seed)
    V = model.cfg.vocab_size
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    out: dict = {"device": device_name(device), "dtype": dtype_name, "prompt_tokens": P,
                 "new_tokens": new_tokens, "repeats": repeats, "batches": {},
                 "decode_path": "eager: antimatter generate's default"}
    if compile:
        out["compiled_decode_path"] = "generate --compile"
    for B in batch_sizes:
        prompts = torch.randint(0, V, (B, P), generator=gen).tolist()
        idx = torch.tensor(prompts, device=device)

        def prefill(idx=idx):
            model(idx)

        def gen_n(n: int, prompts=prompts, compiled: bool = False):
            generate(model, prompts, n, temperature=0.0, compile=compiled)

        t_prefill = _timed(prefill, device, repeats)
        t_first = _timed(lambda: gen_n(1), device, repeats)
        t_all = _timed(lambda: gen_n(new_tokens), device, repeats)
        decode_s = max(t_all - t_first, 1e-9)
        row = {
            "prefill_tokens_per_s": B * P / t_prefill,
            "time_to_first_token_s": t_first,
            "decode_tokens_per_s": B * (new_tokens - 1) / decode_s,
            "decode_ms_per_step": 1000 * decode_s / (new_tokens - 1),
        }
        if compile:
            c_first = _timed(lambda: gen_n(1, compiled=True), device, repeats)
            c_all = _timed(lambda: gen_n(new_tokens, compiled=True), device, repeats)
            row["compiled_decode_tokens_per_s"] = B * (new_tokens - 1) / max(c_all - c_first, 1e-9)
            model.clear_caches()  # compiled generate keeps its cache; the next plain forward needs none
        out["batches"][str(B)] = row
    b1 = out["batches"].get("1", next(iter(out["batches"].values())))
    out["prefill_tokens_per_s"] = b1["prefill_tokens_per_s"]
    out["time_to_first_token_s"] = b1["time_to_first_token_s"]
    out["decode_tokens_per_s_batch1"] = b1["decode_tokens_per_s"]
    big = str(max(batch_sizes))
    out["decode_tokens_per_s_batch" + big] = out["batches"][big]["decode_tokens_per_s"]
    if compile:
        out["compiled_decode_tokens_per_s_batch1"] = b1["compiled_decode_tokens_per_s"]
    if device.type == "cuda":
        out["peak_memory_bytes"] = int(torch.cuda.max_memory_allocated(device))
        out["peak_memory_kind"] = "torch.cuda.max_memory_allocated during the speed runs"
    else:
        out["peak_memory_bytes"] = int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
        out["peak_memory_kind"] = "peak resident set size of the whole process (CPU)"
    return out
