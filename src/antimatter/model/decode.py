"""Decode-time matmuls, swapped into a plain GPT from outside (as accel.py swaps in fp8 Linears).

At batch 1 under torch.compile, a single-row matmul written as a multiply-and-sum becomes one bandwidth-bound
inductor reduction (bias and the following pointwise ops fused), where cuBLAS runs a kernel tuned for larger
shapes; with int8 weights the reduction reads the int8 values and dequantises in registers. The norm in front of
a matmul folds into the same reduction, so no separate statistics kernel runs first.

The model itself stays norm-then-nn.Linear. `single_row_matmuls(model)` swaps each (norm, Linear) pair for one
`NormLinear` holding both (the norm's own slot then holds an nn.Identity), each other block Linear for a
`NormLinear` without a norm, and puts the originals back on exit. Eager calls and inputs of more than one row
take the plain path inside `NormLinear`, so outside compiled single-row steps nothing changes.

`DecodeOptions` carries every switch of compiled decoding (this path's and the Triton decoder's) as an argument
of `generate`, so an A/B run changes one call, not module state that every later call would inherit.
"""

from __future__ import annotations

import ast
import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from antimatter.model.gpt import GPT, RMSNorm
from antimatter.model.quantize import is_int8

KV_BLOCK = 128  # decode attention reads the cache in whole blocks of this many slots


class DecodeTuning:
    """The Triton decoder's tuning results: (GPU, what was tuned, ...) -> the fastest launch shape (`best`)
    and every shape that ran, fastest first (`ranked`). Kept across decoders because timing the candidates
    again costs seconds per call. Whoever holds one decides how far it is shared: `DecodeOptions.tuning`
    passes it to every decoder of a call (an A/B run passes a fresh one per variant, so each tunes its own
    candidates); without one, a decoder uses its model's (`triton_decoder.model_tuning`), which starts from
    the results saved on disk by earlier processes (`load`, `save`) so a second start times nothing again.

    Keys and values are tuples, dicts, strings, numbers and booleans only: the file holds their Python
    literal form, read back with `ast.literal_eval` (no code runs from it)."""

    def __init__(self) -> None:
        self.best: dict[tuple, tuple | dict] = {}
        self.ranked: dict[tuple, list[tuple[int, ...]]] = {}

    def clear(self) -> None:
        self.best.clear()
        self.ranked.clear()

    @classmethod
    def load(cls, path: Path) -> DecodeTuning:
        """The results saved at `path`; empty when the file is missing or unreadable (it is only a cache:
        the decoder then times the candidates again and writes it anew)."""
        tuning = cls()
        try:
            data = ast.literal_eval(path.read_text("utf-8"))
            tuning.best.update(data["best"])
            tuning.ranked.update(data["ranked"])
        except (OSError, ValueError, SyntaxError, TypeError, KeyError, MemoryError, RecursionError):
            tuning.clear()
        return tuning

    def save(self, path: Path) -> None:
        """Write these results merged over what `path` holds (another process may have tuned other shapes),
        through a temporary file and a rename, so a reader never sees half a file. A failure to write (a full
        or read-only disk) leaves the file as it was: the next start tunes again."""
        merged = DecodeTuning.load(path)
        merged.best.update(self.best)
        merged.ranked.update(self.ranked)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(repr({"best": merged.best, "ranked": merged.ranked}), "utf-8")
            os.replace(tmp, path)
        except OSError:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)


@dataclass(frozen=True)
class DecodeOptions:
    """How compiled decoding runs. The defaults are the fastest measured (docs/RESULTS.md); the switches
    exist for A/B runs. Frozen and hashable: the compiled steps and the Triton decoder are cached per value."""

    compile_mode: str = "reduce-overhead"  # CUDA graphs; "max-autotune" also tunes Triton matmuls (slow start)
    # prefill compiled too (with dynamic shapes): a few ms sooner to the first token of a long prompt, for
    # seconds more at every start, since a warm start still traces it; off: the prefill runs eager
    compile_prefill: bool = False
    coordinate_descent: bool = False  # inductor's coordinate-descent tuning of the step (gpt-fast's setting):
    # a little faster, but a cold compile can take minutes
    auto_kernels: bool = True  # compiled decoding on a GPU uses model/triton_decoder.py when it can
    fold_norm: bool = True  # single-row matmuls: the preceding norm folded into the reduction (else its own kernel)
    kv_block: int = KV_BLOCK  # the torch step's attention reads whole blocks of this many cache slots
    split_k: bool = True  # Triton decoder: try split-K block shapes (False: only whole-K ones)
    pdl: bool = True  # Triton decoder: programmatic dependent launch where the GPU has it (False: plain launches)
    tune_attention: bool = True  # Triton decoder: time attention's launch shapes too (False: its defaults)
    tune_in_step: bool = True  # Triton decoder: re-pick block shapes among the fastest alone by timing whole steps
    tuning: DecodeTuning | None = field(default=None, compare=False)  # Triton decoder: None = the model's


class NormLinear(nn.Module):
    """linear(norm(x)) (norm optional), as a multiply-and-sum reduction for one row under torch.compile."""

    def __init__(self, linear: nn.Linear, norm: nn.Module | None = None, fold_norm: bool = True):
        super().__init__()
        self.linear, self.norm, self.fold_norm = linear, norm, fold_norm

    @property
    def weight(self) -> torch.Tensor:  # what callers read off the Linear it stands in for (device, dtype)
        return self.linear.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        norm = self.norm
        if not (x.shape[:-1].numel() == 1 and torch.compiler.is_compiling()):
            return F.linear(x if norm is None else norm(x), self.linear.weight, self.linear.bias)
        w, scale = self.linear.weight, None
        if is_int8(w):  # torchao int8 weight (model/quantize.py): int8 rows times one scale each
            w, scale = w.qdata, w.scale.float().reshape(-1)
        if norm is not None and self.fold_norm:
            y = folded_norm_gemv(x.float(), w.float(), norm)
        else:
            if norm is not None:
                x = norm(x)
            y = (x.float().unsqueeze(-2) * w.float()).sum(-1)
        if scale is not None:
            y = y * scale
        if self.linear.bias is not None:
            y = y + self.linear.bias.float()
        return y.to(x.dtype)


def folded_norm_gemv(x: torch.Tensor, w: torch.Tensor, norm: nn.Module) -> torch.Tensor:
    """W @ norm(x) for one row x (..., K) as reductions over K that all have the output's shape (..., N), so
    inductor emits them as one kernel reading W once. For LayerNorm, with g and b its weight and bias:
        W @ ((x - mean) * rstd * g + b) = rstd * (W@(g*x) - mean * W@g) + W@b,
    and mean and E[x^2] are summed per output row too (x is tiny and stays in cache), so no separate
    statistics kernel runs first. RMSNorm is the same without the mean and bias terms. Every term is linear
    in W, so int8 row scales apply to the result."""
    K = x.shape[-1]
    xr = x.unsqueeze(-2)  # (..., 1, K) against w (N, K)
    rows = (*x.shape[:-1], w.shape[0], K)  # statistics expanded to one copy per output row
    wg = w * norm.weight.float()
    sum_sq = (xr * xr).expand(rows).sum(-1)
    if isinstance(norm, RMSNorm):
        rstd = torch.rsqrt(sum_sq / K + norm.eps)
        y = rstd * (xr * wg).sum(-1)
    else:
        mean = xr.expand(rows).sum(-1) / K
        rstd = torch.rsqrt(sum_sq / K - mean * mean + norm.eps)
        y = rstd * ((xr * wg).sum(-1) - mean * wg.sum(-1))
        if norm.bias is not None:  # nn.LayerNorm(bias=False) keeps the attribute, set to None
            y = y + (w * norm.bias.float()).sum(-1)
    return y


def _sites(model: GPT) -> list[tuple[nn.Module | None, str | None, nn.Module, str]]:
    """(norm owner, norm name, linear owner, linear name) of every matmul of a step; no norm: (None, None)."""
    sites: list[tuple[nn.Module | None, str | None, nn.Module, str]] = []
    for block in model.transformer.h:
        sites += [(block, "ln_1", block.attn, "c_attn"), (None, None, block.attn, "c_proj"),
                  (block, "ln_2", block.mlp, "c_fc"), (None, None, block.mlp, "c_proj")]
    sites.append((model.transformer, "ln_f", model, "lm_head"))
    return sites


@contextlib.contextmanager
def single_row_matmuls(model: GPT, fold_norm: bool = True) -> Iterator[GPT]:
    """Inside: the model's plain nn.Linear matmuls (with their norms) swapped for `NormLinear`s; on exit the
    original modules are back. Converted Linears (torchao's Float8Linear) stay as they are. The `NormLinear`s
    are kept on the model and reused, so compiled steps see the same modules on every call (no recompile)."""
    made = model.__dict__.setdefault("_antimatter_norm_linears", {})
    identity = made.setdefault("identity", nn.Identity())
    swapped: list[tuple[nn.Module, str, nn.Module]] = []  # (owner, name, original) to put back
    try:
        for norm_owner, norm_name, owner, name in _sites(model):
            linear = getattr(owner, name)
            norm = getattr(norm_owner, norm_name) if norm_owner is not None else None
            if type(linear) is not nn.Linear:
                continue
            key = (id(linear), id(norm), fold_norm)  # each NormLinear holds both: ids stay unique
            if key not in made:
                made[key] = NormLinear(linear, norm, fold_norm)
            setattr(owner, name, made[key])
            swapped.append((owner, name, linear))
            if norm_owner is not None:
                setattr(norm_owner, norm_name, identity)
                swapped.append((norm_owner, norm_name, norm))
        yield model
    finally:
        for owner, name, original in reversed(swapped):
            setattr(owner, name, original)
